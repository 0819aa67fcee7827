"""Synthesis templates: the default prompt, replaceable files, the sandbox."""

from __future__ import annotations

import re

import pytest

from pacore.engine import asolve
from pacore.errors import TemplateError, UsageError
from pacore.prompts import SynthesisTemplate
from fakes import ScriptedBackend

PROBLEM = "Find the smallest prime above 1000."
REFERENCES = ["First ref says 1009.", "Second ref says 1013.", "Third ref says 1009 too."]


def test_default_template_frames_numbered_references_after_the_problem():
    text = SynthesisTemplate.default().render(PROBLEM, REFERENCES, round=2, total_rounds=2)
    assert text.count(PROBLEM) == 1
    assert text.index("Original Problem") < text.index(PROBLEM) < text.index("Reference Responses")
    for number, reference in enumerate(REFERENCES, start=1):
        assert text.count(reference) == 1
        assert text.index(f"Reference {number}:") < text.index(reference)
    assert re.findall(r"Reference (\d+):", text) == ["1", "2", "3"]
    assert "own" in text and "solution" in text


def test_default_template_keeps_multiline_references_intact():
    reference = "Line one.\n\n  Indented line two."
    text = SynthesisTemplate.default().render(PROBLEM, [reference], round=2, total_rounds=2)
    assert reference in text


def test_load_none_gives_the_default_and_a_template_passes_through():
    custom = SynthesisTemplate("{{ problem }}")
    assert SynthesisTemplate.load(custom) is custom
    assert SynthesisTemplate.load(None).source == SynthesisTemplate.default().source


def test_a_template_file_replaces_the_default(tmp_path):
    path = tmp_path / "mine.j2"
    path.write_text(
        "Q={{ problem }} round {{ round }}/{{ total_rounds }}\n"
        "{% for r in references %}[{{ loop.index }}] {{ r }}\n{% endfor %}",
        encoding="utf-8",
    )
    for template in (path, str(path)):
        text = SynthesisTemplate.load(template).render("P", ["a", "b"], round=2, total_rounds=3)
        assert text == "Q=P round 2/3\n[1] a\n[2] b"


async def test_the_engine_renders_a_custom_template_file(tmp_path):
    path = tmp_path / "short.j2"
    path.write_text("SYNTH {{ problem }} :: {{ references | join(' | ') }}", encoding="utf-8")
    backend = ScriptedBackend(respond=lambda call, i: f"m{call.number}")
    result = await asolve("Q?", schedule=[2], backend=backend, template=path, seed=1)
    prompt = backend.calls[-1].last_user_text
    assert prompt.startswith("SYNTH Q? :: ")
    assert sorted(prompt.removeprefix("SYNTH Q? :: ").split(" | ")) == ["m0", "m1"]
    assert result.answer == "m2"


def test_missing_file_raises_a_clear_template_error(tmp_path):
    missing = tmp_path / "nope.j2"
    with pytest.raises(TemplateError, match=r"cannot read template .*nope\.j2: No such file"):
        SynthesisTemplate.load(missing)


def test_a_directory_is_not_a_template(tmp_path):
    with pytest.raises(TemplateError, match="cannot read template"):
        SynthesisTemplate.load(tmp_path)


def test_undecodable_file_raises_template_error(tmp_path):
    path = tmp_path / "binary.j2"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(TemplateError, match="cannot read template"):
        SynthesisTemplate.load(path)


def test_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.j2"
    path.write_text("fine line\n{% for r in references %}\n{{ r }}\n", encoding="utf-8")
    with pytest.raises(TemplateError) as caught:
        SynthesisTemplate.load(path)
    message = str(caught.value)
    assert str(path) in message and "line" in message and "\n" not in message


@pytest.mark.parametrize(
    "source",
    ["{{ undefined_name }}", "{{ problem.nope.deeper }}", "{{ references[5] }}"],
)
def test_render_errors_surface_when_the_template_is_loaded(source):
    # Fail before round 1 spends compute, not when round 2 needs the prompt.
    with pytest.raises(TemplateError, match="template <string>"):
        SynthesisTemplate(source)


def test_a_template_rendering_nothing_is_refused():
    with pytest.raises(TemplateError, match="empty synthesis prompt"):
        SynthesisTemplate("{% if false %}x{% endif %}   \n")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ problem.__class__.__mro__[1].__subclasses__() }}",
        "{{ references.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{% set _ = references.append('x') %}{{ references }}",  # immutable sandbox
    ],
)
def test_templates_run_in_the_sandbox(source):
    with pytest.raises(TemplateError, match="unsafe|not safely|undefined"):
        SynthesisTemplate(source)


def test_template_errors_are_usage_errors():
    assert issubclass(TemplateError, UsageError)


async def test_a_bad_template_fails_before_any_backend_call(tmp_path):
    path = tmp_path / "bad.j2"
    path.write_text("{{ nope }}", encoding="utf-8")
    backend = ScriptedBackend()
    with pytest.raises(TemplateError):
        await asolve("Q?", schedule=[2], backend=backend, template=path)
    assert backend.calls == []
