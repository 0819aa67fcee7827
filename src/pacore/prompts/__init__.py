"""Synthesis prompt templates (jinja2 files a user can replace).

A template receives ``problem`` (the original problem text), ``references``
(the shuffled compacted messages of the previous round), ``round`` (1-based
index of the round being prompted) and ``total_rounds``. Templates are
rendered in jinja2's sandbox because users may load them from anywhere.
"""

from __future__ import annotations

import functools
from importlib.resources import files
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pacore.errors import TemplateError

DEFAULT_TEMPLATE_NAME = "synthesis.j2"

_ENV = ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False
)


class SynthesisTemplate:
    """A compiled synthesis template."""

    def __init__(self, source: str, origin: str = "<string>") -> None:
        self.source = source
        self.origin = origin
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"template {origin}: line {exc.lineno}: {exc.message}") from None
        # A trial render, so a broken template fails before any round spends compute.
        self.render("Problem", ["Reference A", "Reference B"], round=2, total_rounds=2)

    @classmethod
    @functools.cache
    def default(cls) -> SynthesisTemplate:
        # Compiled once per process: every request without a template of its own uses it.
        source = files(__name__).joinpath(DEFAULT_TEMPLATE_NAME).read_text(encoding="utf-8")
        return cls(source, origin=f"pacore/prompts/{DEFAULT_TEMPLATE_NAME}")

    @classmethod
    def from_path(cls, path: str | Path) -> SynthesisTemplate:
        try:
            source = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise TemplateError(f"cannot read template {path}: {reason}") from None
        return cls(source, origin=str(path))

    @classmethod
    def load(cls, template: SynthesisTemplate | str | Path | None) -> SynthesisTemplate:
        """``None`` gives the default; a path loads a file; a template passes through."""
        if template is None:
            return cls.default()
        if isinstance(template, SynthesisTemplate):
            return template
        return cls.from_path(template)

    def render(self, problem: str, references: list[str], round: int, total_rounds: int) -> str:
        try:
            text = self._template.render(
                problem=problem, references=references, round=round, total_rounds=total_rounds
            )
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {self.origin}: {exc}") from None
        text = text.strip()
        if not text:
            raise TemplateError(f"template {self.origin}: rendered an empty synthesis prompt")
        return text
