"""Synthesis prompt templates (jinja2 files a user can replace).

A template receives ``original_prompt`` (the text of the last user message,
unstripped) and ``ref_responses`` (the compacted messages of the previous
round, in the order chosen by ``reference_order``): the names of the
reference release. ``problem`` and ``references`` are the same values under
pacore's older names, and ``round`` (1-based index of the round being
prompted) and ``total_rounds`` are there too.

Built-in templates, chosen by name: ``pacore`` (the default: the report's
Table 6 prompt, which the released PaCoRe-8B was trained on) and ``generic``
(a more explicit prompt for models never trained for PaCoRe). Any other
value is a path to a template file.

Rendering uses jinja2's *default* whitespace settings and the result is not
stripped, so the built-in ``pacore`` template gives the report's bytes
exactly. Templates run in jinja2's sandbox, may not load other templates
(``include``, ``import``, ``extends`` are refused at load) and their work is
bounded: loop iterations and ``range()`` items per render, numbers handed
to functions and filters, and the rendered size are capped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

from pacore.errors import TemplateError

#: Built-in templates by name, and the package file holding each.
BUILTIN_TEMPLATES: dict[str, str] = {"pacore": "pacore.j2", "generic": "generic.j2"}
DEFAULT_TEMPLATE = "pacore"

#: Largest synthesis prompt a template may render, in characters: far above
#: any model's context (32 references of a 131k-token conclusion are ~16M).
MAX_RENDERED_CHARS = 32 * 1024 * 1024
#: Largest template file read.
MAX_TEMPLATE_BYTES = 1024 * 1024
#: Total ``range()`` items one render may iterate, and the largest number a
#: template may pass to a function, filter or repetition (``"x" * n``).
MAX_TEMPLATE_NUMBER = MAX_RANGE
#: ``{% for %}`` iterations one render may run in all (nested loops multiply).
MAX_LOOP_ITEMS = 1_000_000
_MAX_POWER_BITS = 64 * 1024
# The render variable every ``{% for %}`` iterates through (see _LoopBudget).
_LOOP_BUDGET = "pacore_loop_budget"

_FORBIDDEN_TAGS: tuple[tuple[type[nodes.Node], str], ...] = (
    (nodes.Extends, "extends"),
    (nodes.Include, "include"),
    (nodes.Import, "import"),
    (nodes.FromImport, "from ... import"),
)


def _check_number(value: object, where: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TEMPLATE_NUMBER:
        raise SecurityError(f"{where} was given {_describe(value)}, more than the limit of {MAX_TEMPLATE_NUMBER}")


def _describe(number: int) -> str:
    # str() of a huge int is slow (and refused past 4300 digits).
    return str(number) if number.bit_length() <= 64 else f"a {number.bit_length()}-bit number"


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` refusing huge numbers among its arguments (``center(10**9)``...).

    The filtered value itself may be any number; only the arguments are checked.
    """
    skip = 2 if getattr(function, "jinja_pass_arg", None) is not None else 1

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        for value in (*args[skip:], *kwargs.values()):
            _check_number(value, f"filter {name}")
        return function(*args, **kwargs)

    return bounded


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with the arithmetic that can blow up memory or time bounded."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self) -> None:
        # jinja2's defaults otherwise (no trim_blocks, no lstrip_blocks, final newline dropped).
        super().__init__(undefined=jinja2.StrictUndefined, autoescape=False)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for count, other in ((left, right), (right, left)):
                if isinstance(other, (str, list, tuple)):
                    _check_number(count, "a repetition")
        elif (
            isinstance(left, int)
            and isinstance(right, int)
            and right > 0
            and left.bit_length() * right > _MAX_POWER_BITS
        ):
            raise SecurityError(f"{_describe(left)} ** {_describe(right)} is too large a number for a template")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        for value in (*args, *kwargs.values()):
            _check_number(value, "a function")
        return super().call(__context, __obj, *args, **kwargs)


_ENV = _BoundedEnvironment()


class _RangeBudget:
    """A ``range`` whose items, over one render, add up to at most ``MAX_TEMPLATE_NUMBER``.

    The sandbox caps each ``range()`` alone; nested loops would still multiply.
    """

    def __init__(self) -> None:
        self.left = MAX_TEMPLATE_NUMBER

    def __call__(self, *args: int) -> range:
        items = range(*args)
        if len(items) > self.left:
            raise SecurityError(f"range() asked for more than {MAX_TEMPLATE_NUMBER} items in all during one render")
        self.left -= len(items)
        return items


class _LoopBudget:
    """Counts the items of every ``{% for %}`` of one render; too many end it."""

    def __init__(self) -> None:
        self.left = MAX_LOOP_ITEMS

    def __call__(self, iterable: Any) -> Any:
        for item in iterable:
            if self.left <= 0:
                raise SecurityError(f"loops ran more than {MAX_LOOP_ITEMS} iterations in all during one render")
            self.left -= 1
            yield item


def _refuse_loading_tags(source: str, origin: str) -> jinja2.Template:
    """Compile ``source``; a template that loads other templates is refused.

    Templates are self-contained: the environment has no loader, and a
    template from anywhere must not reach other files. Every loop is made to
    iterate through the render's loop budget, so nested loops over long
    texts cannot run for minutes.
    """
    try:
        tree = _ENV.parse(source)
        for node_type, tag in _FORBIDDEN_TAGS:
            node = next(tree.find_all(node_type), None)
            if node is not None:
                raise TemplateError(
                    f"template {origin}: line {node.lineno}: '{{% {tag} %}}' is not allowed: "
                    "a synthesis template must be self-contained"
                )
        for loop in tree.find_all(nodes.For):
            budget = nodes.Name(_LOOP_BUDGET, "load", lineno=loop.lineno)
            loop.iter = nodes.Call(budget, [loop.iter], [], None, None, lineno=loop.lineno)
        return _ENV.from_string(tree)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template {origin}: line {exc.lineno}: {exc.message}") from None


def compile_template(source: str, origin: str) -> jinja2.Template:
    """Compile a user template in the bounded sandbox (also used for the verifier's prompt)."""
    return _refuse_loading_tags(source, origin)


def render_bounded(template: jinja2.Template, values: dict[str, Any], origin: str) -> str:
    """Render ``template`` within the size cap; any failure is a :class:`TemplateError`."""
    pieces: list[str] = []
    size = 0
    try:
        for piece in template.generate({"range": _RangeBudget(), _LOOP_BUDGET: _LoopBudget(), **values}):
            size += len(piece)
            if size > MAX_RENDERED_CHARS:
                raise SecurityError(f"rendered more than {MAX_RENDERED_CHARS} characters")
            pieces.append(piece)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"template {origin}: {exc}") from None
    except (ArithmeticError, AttributeError, LookupError, MemoryError, RecursionError, TypeError, ValueError) as exc:
        raise TemplateError(f"template {origin}: {type(exc).__name__}: {exc}") from None
    return "".join(pieces)


def read_template_file(path: str | Path, what: str = "template") -> str:
    """The UTF-8 text of a template file of at most :data:`MAX_TEMPLATE_BYTES`; a one-line TemplateError
    (``cannot read <what> <path>: ...``) when it is missing, not a regular file, too large or not UTF-8."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            raise TemplateError(f"cannot read {what} {path}: not a regular file")
        with path.open("rb") as file:
            data = file.read(MAX_TEMPLATE_BYTES + 1)
        if len(data) > MAX_TEMPLATE_BYTES:
            raise TemplateError(f"cannot read {what} {path}: larger than {MAX_TEMPLATE_BYTES} bytes")
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TemplateError(f"cannot read {what} {path}: {reason}") from None


class SynthesisTemplate:
    """A compiled synthesis template."""

    def __init__(self, source: str, origin: str = "<string>") -> None:
        self.source = source
        self.origin = origin
        self._template = _refuse_loading_tags(source, origin)
        # A trial render, so a broken template fails before any round spends compute.
        self.render("Problem", ["Reference A", "Reference B"], round=2, total_rounds=2)

    @classmethod
    @functools.cache
    def builtin(cls, name: str = DEFAULT_TEMPLATE) -> SynthesisTemplate:
        """A built-in template by name (``pacore`` or ``generic``); compiled once per process."""
        if name not in BUILTIN_TEMPLATES:
            raise TemplateError(f"no built-in template {name!r} (built-in: {', '.join(BUILTIN_TEMPLATES)})")
        source = files(__name__).joinpath(BUILTIN_TEMPLATES[name]).read_text(encoding="utf-8")
        return cls(source, origin=name)

    @classmethod
    def default(cls) -> SynthesisTemplate:
        return cls.builtin(DEFAULT_TEMPLATE)

    @classmethod
    def from_path(cls, path: str | Path) -> SynthesisTemplate:
        return cls(read_template_file(path), origin=str(path))

    @classmethod
    def load(cls, template: SynthesisTemplate | str | Path | None) -> SynthesisTemplate:
        """``None`` gives the default; a built-in's name gives it; another string or a
        path loads a file (write ``./pacore`` for a file named like a built-in);
        a template passes through."""
        if template is None:
            return cls.default()
        if isinstance(template, SynthesisTemplate):
            return template
        if isinstance(template, str) and template in BUILTIN_TEMPLATES:
            return cls.builtin(template)
        return cls.from_path(template)

    def render(self, problem: str, references: Sequence[str], round: int, total_rounds: int) -> str:
        """The synthesis prompt, exactly as rendered (never stripped)."""
        values = {
            "original_prompt": problem,
            "ref_responses": list(references),
            "problem": problem,
            "references": list(references),
            "round": round,
            "total_rounds": total_rounds,
        }
        text = render_bounded(self._template, values, self.origin)
        if not text.strip():
            raise TemplateError(f"template {self.origin}: rendered an empty synthesis prompt")
        return text
