"""Backend and generation flags shared by the commands that run the engine.

A command declares the options it needs with these annotated types, then
turns them into engine objects with :func:`solve_setup` (or, for a command
that only needs a model, :func:`open_backends`); ``pacore ask`` and ``pacore run``
take the same set, :class:`SolveFlags`, from :func:`with_solve_options`. All
validation lives here, so ``pacore ask``, ``pacore run`` and ``pacore serve`` reject the same
values with the same one-line messages. The adaptive-compute flags are added
to a command by :func:`with_compute_options`, which hands it one
:class:`~pacore.ComputePolicy` built by :func:`compute_policy`.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, get_type_hints

import typer
from pydantic import BaseModel, ValidationError

from pacore.adaptive import ComputePolicy
from pacore.errors import OutputError, UsageError
from pacore.files import output_path
from pacore.flags import Flag, declared_flags
from pacore.schedule import Schedule

# The engine's objects (and jinja2, behind the templates) are imported where a command builds them:
# declaring the options, which every `pacore` command line does, needs none of them.
if TYPE_CHECKING:
    from pacore.backends import Backend, GenerationParams
    from pacore.options import SolveOptions
    from pacore.prompts import SynthesisTemplate
    from pacore.synthesis import ReferenceOrder

BACKEND_PANEL = "Backend"
GENERATION_PANEL = "Generation"
COMPUTE_PANEL = "Adaptive compute (all off by default; see docs/adaptive-compute.md)"


def panel_option(panel: str) -> functools.partial[Any]:
    """``typer.Option`` for the options --help lists under ``panel``."""
    return functools.partial(typer.Option, rich_help_panel=panel)


backend_option = panel_option(BACKEND_PANEL)
_generation_option = panel_option(GENERATION_PANEL)


BackendOption = Annotated[
    list[str] | None,
    backend_option(
        "--backend",
        "-b",
        metavar="SPEC",
        help="Model to use: an OpenAI-compatible server URL (http://host:port/v1), "
        "gguf:/path/model.gguf, or 'embedded' (the default, Gemma 3 270M). Repeat it to "
        "spread the calls over several endpoints.",
        show_default=False,
    ),
]
ModelOption = Annotated[
    str | None,
    backend_option("--model", "-m", help="Model name sent to the server."),
]
ApiKeyOption = Annotated[
    str | None,
    backend_option("--api-key", envvar="PACORE_API_KEY", show_envvar=True, help="API key for the server."),
]
TimeoutOption = Annotated[
    float | None,
    backend_option(
        "--timeout",
        metavar="SECONDS",
        help="Inactivity limit of an HTTP call: an attempt fails when the server sends nothing for "
        "this long. Calls stream, so one that keeps producing tokens is never cut; --deadline "
        "bounds a whole request \\[default: 1800].",
    ),
]
RetriesOption = Annotated[
    int | None,
    backend_option(
        "--retries",
        metavar="N",
        help="Retries of a failed HTTP call (connection errors, timeouts, 429, 5xx) \\[default: the backend's].",
    ),
]
ThreadsOption = Annotated[
    int | None,
    backend_option(
        "--threads",
        metavar="N",
        envvar="PACORE_THREADS",
        show_envvar=True,
        help="CPU threads of the embedded or GGUF model \\[default: 1, measured steadiest on 2 cores].",
        show_default=False,
    ),
]
MaxTokensOption = Annotated[
    int | None,
    _generation_option(
        "--max-tokens",
        metavar="N",
        help="Most tokens each call may generate \\[default: the backend's; embedded: 512; "
        "gguf: to the end of the context].",
    ),
]
TemperatureOption = Annotated[
    float,
    _generation_option("--temperature", "-t", help="Sampling temperature."),
]
TopPOption = Annotated[float, _generation_option("--top-p", help="Nucleus sampling mass.")]
SeedOption = Annotated[
    int | None,
    _generation_option(
        "--seed",
        help="Seed for sampling and for shuffling the references (same seed, same run "
        "where the backend supports seeds).",
    ),
]
ScheduleOption = Annotated[
    str,
    _generation_option(
        "--schedule",
        "-s",
        metavar="K",
        help="Trajectories per coordinated round: a preset (low=4, medium=16, high=32,4, "
        "off) or counts like 8 or 16,4. A final single-call round is always added.",
    ),
]
DeadlineOption = Annotated[
    float | None,
    _generation_option(
        "--deadline",
        metavar="SECONDS",
        help="Give up on a request (in 'pacore run': on a problem) after this long; the rounds "
        "computed so far are kept in its trace.",
        show_default=False,
    ),
]
MinSuccessOption = Annotated[
    float | None,
    _generation_option(
        "--min-success",
        metavar="FRACTION",
        help="Fraction of a coordinated round's trajectories (or of majority's samples) that must "
        "succeed to go on, e.g. 0.5 \\[default: at least one].",
        show_default=False,
    ),
]
TemplateOption = Annotated[
    str | None,
    _generation_option(
        "--template",
        metavar="NAME|FILE",
        help="Synthesis prompt: 'pacore' (the report's Table 6 prompt, which PaCoRe-trained models "
        "expect), 'generic' (a more explicit prompt for other models) or a Jinja2 template file "
        "\\[default: pacore].",
        show_default=False,
    ),
]
ReferenceOrderOption = Annotated[
    str,
    _generation_option(
        "--reference-order",
        metavar="shuffle|release",
        help="Order of the references in a synthesis prompt: 'shuffle' (seeded per round) or "
        "'release' (the reference release's: by length, then shuffled with --seed; use --seed 42 "
        "to send what it sends).",
    ),
]


class FlaggedField(NamedTuple):
    """A field of a settings class that a command-line flag sets."""

    name: str
    type: Any
    default: Any
    flag: Flag

    def parameter(self, panel: str, *, unset_means_default: bool = False) -> inspect.Parameter:
        """The field as a keyword parameter of a typer command, its option listed under ``panel``.

        With ``unset_means_default``, a flag not given passes ``None`` (``False`` for a switch), so
        the settings class applies its own default; ``--help`` shows it inside the help text.
        """
        flag = self.flag
        if unset_means_default:
            kind, default = (bool, False) if self.type is bool else (self.type | None, None)
            shown = flag.default_text or (f"{self.default:g}" if _is_number(self.default) else None)
        else:
            kind, default, shown = self.type, self.default, flag.default_text
        help = flag.help if shown is None else f"{flag.help.removesuffix('.')} \\[default: {shown}]."
        option = typer.Option(
            flag.name,
            metavar=flag.metavar,
            min=flag.min,
            help=help,
            rich_help_panel=panel,
            show_default=shown is None and not unset_means_default,
        )
        return inspect.Parameter(
            self.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, option], default=default
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def flagged_fields(settings: type) -> list[FlaggedField]:
    """The fields of ``settings`` (a dataclass or a pydantic model) declared with a :class:`Flag`, in order.

    Their defaults are those of ``settings()``.
    """
    # A model's defaults without validating them: its validator is built when a command uses it.
    defaults = settings.model_construct() if issubclass(settings, BaseModel) else settings()
    return [FlaggedField(name, kind, getattr(defaults, name), flag) for name, kind, flag in declared_flags(settings)]


#: The adaptive-compute flags' names, by the ComputePolicy field each sets.
_COMPUTE_FLAGS = {field.name: field.flag.name for field in flagged_fields(ComputePolicy)}


def compute_policy(**flags: Any) -> ComputePolicy | None:
    """The :class:`ComputePolicy` the adaptive-compute flags ask for (``None`` when none is given).

    Takes the flags by their ComputePolicy field names; a bad value is a
    one-line :class:`UsageError` naming the flag.
    """
    given = {name: value for name, value in flags.items() if value is not None and value is not False}
    if not given:
        return None
    try:
        return ComputePolicy(**given)
    except ValidationError as exc:
        raise UsageError(_policy_problem(exc)) from None


def _policy_problem(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    field = error["loc"][0] if error["loc"] else None
    if isinstance(field, str) and field in _COMPUTE_FLAGS:
        return f"{_COMPUTE_FLAGS[field]}: {message[:1].lower()}{message[1:]}, got {error['input']!r}"
    # A rule across fields names them: say their flags.
    return re.sub(r"\b[a-z_]+\b", lambda m: _COMPUTE_FLAGS.get(m[0], m[0]), message)


def with_compute_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the adaptive-compute flags to a typer command.

    The command declares a ``compute: ComputePolicy | None`` parameter; typer
    sees the flags instead, and the command receives the policy they build
    (``None`` when no flag is given).
    """
    added = [field.parameter(COMPUTE_PANEL, unset_means_default=True) for field in flagged_fields(ComputePolicy)]
    return _expand_parameter(command, "compute", added, compute_policy)


def with_settings_options(name: str, settings: type, panel: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the flags of ``settings``' fields (see :class:`pacore.flags.Flag`) to a typer command.

    The command declares a parameter ``name``; typer sees the flags instead, listed under
    ``panel`` with the fields' defaults, and the command receives ``settings(**their values)``.
    """
    added = [field.parameter(panel) for field in flagged_fields(settings)]
    return lambda command: _expand_parameter(command, name, added, settings)


def with_solve_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the generation and backend flags of :class:`SolveFlags`, then the adaptive-compute ones.

    The command declares a keyword-only ``flags: SolveFlags`` parameter followed by
    ``compute: ComputePolicy | None`` (see :func:`with_compute_options`); typer sees the
    flags instead, and the command receives one :class:`SolveFlags` holding them.
    """
    hints = get_type_hints(SolveFlags, include_extras=True)
    added = [
        inspect.Parameter(
            field.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[field.name], default=field.default
        )
        for field in fields(SolveFlags)
    ]
    return with_compute_options(_expand_parameter(command, "flags", added, SolveFlags))


def _expand_parameter(
    command: Callable[..., Any], name: str, added: list[inspect.Parameter], build: Callable[..., Any]
) -> Callable[..., Any]:
    """``command`` with its parameter ``name`` replaced, where it stood, by the ``added`` ones.

    The command receives ``build(**values of the added parameters)`` as ``name``.
    """
    signature = inspect.signature(command, eval_str=True)
    parameters = list(signature.parameters.values())
    position = [p.name for p in parameters].index(name)
    parameters[position : position + 1] = added

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {p.name: kwargs.pop(p.name) for p in added if p.name in kwargs}
        return command(*args, **{name: build(**values)}, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


class SolveSetup(NamedTuple):
    """Everything :func:`pacore.asolve` needs besides the prompt and the event callback."""

    backend: Backend
    options: SolveOptions


def generation_params(
    *, max_tokens: int | None, temperature: float, top_p: float, seed: int | None
) -> GenerationParams:
    from pacore.backends import GenerationParams

    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"--temperature must be 0 or more and finite, got {temperature:g}")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be greater than 0 and at most 1, got {top_p:g}")
    return GenerationParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)


def check_limits(*, deadline: float | None, min_success: float | None) -> None:
    """Refuse a bad ``--deadline`` or ``--min-success`` before any work starts."""
    if deadline is not None and not deadline > 0:
        raise UsageError(f"--deadline must be a positive number of seconds, got {deadline:g}")
    if min_success is not None and not 0 < min_success <= 1:
        raise UsageError(f"--min-success must be a fraction greater than 0 and at most 1, got {min_success:g}")


def parse_reference_order(value: str) -> ReferenceOrder:
    """The ``--reference-order`` value, checked."""
    from pacore.synthesis import REFERENCE_ORDERS

    if value not in REFERENCE_ORDERS:
        raise UsageError(f"--reference-order must be one of {', '.join(REFERENCE_ORDERS)}, got {value!r}")
    return value  # type: ignore[return-value]


def load_template(template: str | Path | None, schedule: Schedule) -> SynthesisTemplate:
    """Load a template (a built-in's name or a file) and render it once per synthesis round of ``schedule``.

    The trial render catches unknown variables now rather than after the
    first round has spent its compute.
    """
    from pacore.prompts import SynthesisTemplate

    synthesis = SynthesisTemplate.load(template)
    ks = schedule.ks
    for index in range(1, len(ks)):
        synthesis.render(
            problem="example problem",
            references=["example reference"] * ks[index - 1],
            round=index + 1,
            total_rounds=len(ks),
        )
    return synthesis


def open_backends(
    specs: Sequence[str] | None,
    *,
    model: str | None = None,
    api_key: str | None = None,
    timeout: float | None = None,
    retries: int | None = None,
    threads: int | None = None,
) -> Backend:
    """Open the backend that ``--backend`` names (the embedded model when none).

    Takes the list of every ``--backend`` given; several make one backend
    that sends each call to the least busy of them (see ``pacore.backends.router``).
    """
    from pacore.backends import RetryPolicy, open_backend

    specs = [spec for spec in specs or () if spec.strip()]
    if timeout is not None and not timeout > 0:  # NaN too
        raise UsageError(f"--timeout must be positive, got {timeout:g}")
    if retries is not None and retries < 0:
        raise UsageError(f"--retries must be 0 or more, got {retries}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
        # It travels in an HTTP header; never echoed back.
        raise UsageError("--api-key (or $PACORE_API_KEY) must be printable ASCII")
    options: dict[str, Any] = {"model": model, "api_key": api_key, "timeout": timeout, "threads": threads}
    if retries is not None:
        options["retry"] = RetryPolicy(max_attempts=retries + 1)
    # Unset flags are left out so each backend keeps its own defaults.
    return open_backend(specs, **{k: v for k, v in options.items() if v is not None})


@dataclass(frozen=True)
class SolveFlags:
    """The generation and backend flags of ``pacore ask`` and ``pacore run``, as given.

    :func:`with_solve_options` declares them (each field's annotation is its typer option,
    in --help order); the methods check them and build the engine objects.
    """

    template: TemplateOption = None
    reference_order: ReferenceOrderOption = "shuffle"
    max_tokens: MaxTokensOption = None
    temperature: TemperatureOption = 1.0
    top_p: TopPOption = 1.0
    seed: SeedOption = None
    deadline: DeadlineOption = None
    min_success: MinSuccessOption = None
    backend: BackendOption = None
    model: ModelOption = None
    api_key: ApiKeyOption = None
    timeout: TimeoutOption = None
    retries: RetriesOption = None
    threads: ThreadsOption = None

    def solve_options(
        self, schedule: Schedule, *, compute: ComputePolicy | None = None, stream_answer: bool = False
    ) -> SolveOptions:
        """Validate every flag but the backend ones; the template is trial-rendered for ``schedule``."""
        from pacore.options import SolveOptions

        params = generation_params(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed
        )
        check_limits(deadline=self.deadline, min_success=self.min_success)
        return SolveOptions(
            schedule=schedule, params=params, template=load_template(self.template, schedule),
            deadline=self.deadline, min_success=self.min_success,
            reference_order=parse_reference_order(self.reference_order), stream_answer=stream_answer,
            compute=compute,
        )  # fmt: skip

    def open_backend(self) -> Backend:
        """Validate the backend flags and open the backend (the slow part: call it last)."""
        return open_backends(
            self.backend, model=self.model, api_key=self.api_key, timeout=self.timeout, retries=self.retries,
            threads=self.threads,
        )  # fmt: skip


def solve_setup(
    flags: SolveFlags, *, schedule: str, compute: ComputePolicy | None = None, stream_answer: bool = False
) -> SolveSetup:
    """Validate every flag, then open the backend (the slow part) last."""
    options = flags.solve_options(Schedule.parse(schedule), compute=compute, stream_answer=stream_answer)
    return SolveSetup(flags.open_backend(), options)


def out_option(metavar: str, help: str) -> Any:
    """The ``--out``/``-o`` option of a command that writes ``metavar`` (a file or a directory)."""
    return typer.Option("--out", "-o", metavar=metavar, parser=_output_path, help=help)


def _output_path(text: str) -> Path:
    """An empty ``--out`` is a usage error, not the current directory."""
    try:
        return output_path(text)
    except OutputError as exc:
        raise typer.BadParameter(str(exc)) from None
