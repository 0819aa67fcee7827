"""Synthesis templates: the report's Table 6 prompt byte for byte, built-ins by name, bounded user templates."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jinja2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fakes import ScriptedBackend
from pacore.engine import asolve
from pacore.errors import TemplateError, UsageError
from pacore.prompts import (
    BUILTIN_TEMPLATES,
    MAX_LOOP_ITEMS,
    MAX_RENDERED_CHARS,
    MAX_TEMPLATE_BYTES,
    SynthesisTemplate,
)

# The prompting function of the report's Table 6, as PACORE_METHOD.md gives it (a
# source file ends with a newline, which jinja2 drops by default).
TABLE_6 = """\
You are given a problem and a list of reference responses. Your job is to analyze these references and provide your own response.

Original Problem:
{{ original_prompt }}

Reference Responses:
{% for response in ref_responses %}
Reference {{ loop.index }}:
{{ response }}
{% endfor %}

Now, based on the original problem and reference responses above, please provide your own comprehensive solution.
"""

# The worked example of PACORE_METHOD.md, as the JSON string given there.
WORKED_EXAMPLE_JSON = (
    r'"You are given a problem and a list of reference responses. Your job is to analyze these references and '
    r"provide your own response.\n\nOriginal Problem:\nWhat is 2+3?\n\nReference Responses:\n\nReference 1:\n\n\n"
    r"The answer is 5.\n\nReference 2:\nIt is **5**.\n\n\n\nNow, based on the original problem and reference "
    r'responses above, please provide your own comprehensive solution."'
)


def release_render(original_prompt: str, ref_responses: list[str]) -> str:
    """What the release renders: ``jinja2.Template`` with jinja2's defaults, not stripped."""
    return jinja2.Template(TABLE_6).render(original_prompt=original_prompt, ref_responses=ref_responses)


def render(template: SynthesisTemplate, problem: str, references: list[str]) -> str:
    return template.render(problem, references, round=2, total_rounds=2)


# --- the default template is Table 6, byte for byte ----------------------------


def test_the_worked_example_renders_exactly_the_documented_bytes():
    rendered = render(SynthesisTemplate.default(), "What is 2+3?", ["\n\nThe answer is 5.", "It is **5**.\n"])
    assert rendered == json.loads(WORKED_EXAMPLE_JSON)


def test_the_default_is_the_builtin_pacore_template_and_credits_table_6():
    template = SynthesisTemplate.default()
    assert template is SynthesisTemplate.load(None) is SynthesisTemplate.load("pacore")
    assert template.origin == "pacore"
    first_line = template.source.splitlines()[0]
    assert first_line.startswith("{#") and first_line.endswith("-#}") and "Table 6" in first_line


text_with_edges = st.text(st.characters(exclude_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["", "\n", "x\n", "\nx", "\n\nx\n\n", "  x  ", "a</think>\n\nb", "{{ not jinja }}", "{% raw %}"]
)


@given(text_with_edges, st.lists(text_with_edges, min_size=1, max_size=5))
def test_renders_what_the_release_renders_for_any_text(problem, references):
    # With and without trailing newlines in x and in the messages: jinja2 defaults, no strip.
    if not release_render(problem, references).strip():
        return
    assert render(SynthesisTemplate.default(), problem, references) == release_render(problem, references)


@pytest.mark.parametrize("problem", ["Q", "Q\n", "\nQ", "Q\n\n"])
@pytest.mark.parametrize("message", ["A", "A\n", "\n\nA", "\n\nA\n\n"])
def test_newlines_of_problem_and_messages_survive(problem, message):
    rendered = render(SynthesisTemplate.default(), problem, [message, "B"])
    assert (
        f"Original Problem:\n{problem}\n\nReference Responses:\n\nReference 1:\n{message}\n\nReference 2:\nB\n\n\n"
        in rendered
    )
    assert rendered.endswith("please provide your own comprehensive solution.")  # no trailing newline


# --- variables and built-ins ----------------------------------------------------


def test_every_template_gets_the_release_names_and_ours():
    source = (
        "{{ original_prompt }}|{{ problem }}|{{ ref_responses | join(',') }}|{{ references | join(',') }}"
        "|{{ round }}/{{ total_rounds }}"
    )
    rendered = SynthesisTemplate(source).render(" P\n", ["a", "b\n"], round=3, total_rounds=4)
    assert rendered == " P\n| P\n|a,b\n|a,b\n|3/4"


def test_rendering_uses_jinja2_default_whitespace_and_no_strip():
    # trim_blocks would eat the newline after the tag; lstrip_blocks the indent; a strip the edges.
    rendered = SynthesisTemplate("  {% if true %}\nX{% endif %}\n\n").render("p", ["r"], round=2, total_rounds=2)
    assert rendered == "  \nX\n"


def test_generic_is_selectable_by_name_and_tidy():
    generic = SynthesisTemplate.load("generic")
    assert generic.origin == "generic" and generic is not SynthesisTemplate.default()
    rendered = render(generic, " Q \n", ["\n\nfirst\n", "second"])
    assert rendered.startswith("You are given a problem and several reference responses")
    assert (
        "Original Problem:\nQ\n\nReference Responses:\n\nReference 1:\nfirst\n\nReference 2:\nsecond\n\nAnalyze"
        in rendered
    )
    assert rendered == rendered.strip()


def test_builtins_are_package_data_and_all_load():
    assert set(BUILTIN_TEMPLATES) == {"pacore", "generic"}
    for name in BUILTIN_TEMPLATES:
        assert SynthesisTemplate.builtin(name).origin == name


def test_an_unknown_builtin_name_is_a_template_error():
    with pytest.raises(TemplateError, match="no built-in template 'nope'"):
        SynthesisTemplate.builtin("nope")


def test_a_path_loads_a_file_even_one_named_like_a_builtin(tmp_path, monkeypatch):
    (tmp_path / "pacore").write_text("Mine: {{ problem }} {{ references | length }}")
    monkeypatch.chdir(tmp_path)
    assert SynthesisTemplate.load("pacore").origin == "pacore"  # the name wins
    mine = SynthesisTemplate.load("./pacore")
    assert render(mine, "x", ["a", "b"]) == "Mine: x 2"
    assert render(SynthesisTemplate.load(tmp_path / "pacore"), "y", ["a"]) == "Mine: y 1"


# --- loading user templates: refused in one line, bounded ---------------------------


@pytest.mark.parametrize(
    ("source", "tag"),
    [
        ('{% include "other.j2" %}', "include"),
        ('{% import "macros.j2" as m %}{{ problem }}', "import"),
        ('{% from "macros.j2" import f %}{{ problem }}', "from ... import"),
        ('{% extends "base.j2" %}', "extends"),
        ('{{ problem }}\n{% if round > 1 %}{% include "/etc/passwd" %}{% endif %}', "include"),
    ],
)
def test_templates_that_load_other_templates_are_refused_at_load(source, tag):
    with pytest.raises(TemplateError) as caught:
        SynthesisTemplate(source, origin="user.j2")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("template user.j2: line ")
    assert f"'{{% {tag} %}}' is not allowed" in message


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("{% for i in range(10**9) %}x{% endfor %}", "limit of 100000"),
        ("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}x", "range() asked for more"),
        ('{{ "x" * 10**9 }}', "repetition was given 1000000000"),
        ("{{ [1] * 10**9 }}", "repetition"),
        ("{{ 10 ** 1000000 }}", "too large a number"),
        ('{{ "x".center(10**9) }}', "a function was given"),
        ('{{ "x" | center(10**9) }}', "filter center was given"),
        ('{{ "x" | indent(10**9, true) }}', "filter indent"),
        ('{% for i in range(100000) %}{{ "x" * 100000 }}{% endfor %}', f"more than {MAX_RENDERED_CHARS} characters"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
        ("{{ 1 // 0 }}", "ZeroDivisionError"),
        ("{{ problm }}", "'problm' is undefined"),
        ("{% for r in references %}{{ r }}", "line 1"),
        ("   \n", "rendered an empty synthesis prompt"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ],
)
def test_runaway_or_broken_templates_fail_fast_with_one_line(source, fragment):
    started = time.thread_time()  # CPU, not wall time: a loaded machine's waits do not count
    with pytest.raises(TemplateError) as caught:
        SynthesisTemplate(source, origin="user.j2")
    assert time.thread_time() - started < 10
    message = str(caught.value)
    assert "\n" not in message and "user.j2" in message
    assert fragment in message


def test_nested_loops_over_long_inputs_are_cut_at_render():
    quadratic = SynthesisTemplate("{% for c in problem %}{% for d in problem %}{% endfor %}{% endfor %}x")
    assert quadratic.render("short", [], round=2, total_rounds=2) == "x"
    started = time.thread_time()  # CPU, not wall time: a loaded machine's waits do not count
    with pytest.raises(TemplateError, match=f"more than {MAX_LOOP_ITEMS} iterations"):
        quadratic.render("a" * 100_000, [], round=2, total_rounds=2)
    assert time.thread_time() - started < 10


def test_loops_keep_their_features_under_the_budget():
    template = SynthesisTemplate(
        "{% for r in references %}{{ loop.index }}/{{ loop.length }}:{{ r }} {% else %}none{% endfor %}"
        "|{% for x in references if x != 'b' %}{{ x }}{% endfor %}"
    )
    assert template.render("p", ["a", "b", "c"], round=2, total_rounds=2) == "1/3:a 2/3:b 3/3:c |ac"
    assert template.render("p", [], round=2, total_rounds=2) == "none|"


def test_big_numbers_as_filtered_values_are_fine():
    rendered = SynthesisTemplate("{{ 10**12 }} {{ 12345678901 | string }} {{ '=' * 80 }}").render(
        "p", [], round=2, total_rounds=2
    )
    assert rendered == "1000000000000 12345678901 " + "=" * 80


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: d / "missing.j2", "cannot read template"),
        (lambda d: d, "not a regular file"),
        (lambda d: _write(d / "big.j2", b"x" * (MAX_TEMPLATE_BYTES + 1)), f"larger than {MAX_TEMPLATE_BYTES} bytes"),
        (lambda d: _write(d / "latin1.j2", b"caf\xe9 {{ problem }}"), "cannot read template"),
    ],
)
def test_unusable_template_files_are_one_line_errors(tmp_path, make, fragment):
    with pytest.raises(TemplateError, match="^[^\n]*$") as caught:
        SynthesisTemplate.load(make(tmp_path))
    assert fragment in str(caught.value)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- replaceable files and the sandbox -------------------------------------------

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
        # Not stripped: the newline before {% endfor %} stays.
        assert text == "Q=P round 2/3\n[1] a\n[2] b\n"


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


@pytest.mark.parametrize("name", ["generic", "pacore"])
async def test_asolve_takes_a_builtin_template_by_name(name):
    backend = ScriptedBackend(respond=lambda call, i: f"m{call.number}")
    await asolve("Q?", schedule=[1], backend=backend, template=name)
    assert backend.calls[-1].last_user_text == render(SynthesisTemplate.builtin(name), "Q?", ["m0"])
    assert backend.calls[-1].last_user_text.startswith(
        "You are given a problem and "
        + ("several reference responses" if name == "generic" else "a list of reference responses")
    )
