"""pacore: Parallel Coordinated Reasoning for any language model.

The whole public API::

    import pacore
    result = pacore.solve("How many primes are below 100?", schedule="low")
    print(result.answer, result.usage.completion_tokens)

Evaluation (data sets, graders, batch runs, reports, training export) lives
in :mod:`pacore.eval`, RL rewards in :mod:`pacore.rewards`, the server in
:mod:`pacore.server`.
"""

from typing import TYPE_CHECKING

from pacore._lazy import lazy_attributes
from pacore.errors import (
    BackendError,
    ContextOverflowError,
    DatasetError,
    DeadlineExceededError,
    InputError,
    PacoreError,
    RoundFailedError,
    ScheduleError,
    StoreError,
    TemplateError,
    UsageError,
)

if TYPE_CHECKING:
    from pacore.adaptive import ComputePolicy
    from pacore.api import asolve, iter_solve, solve
    from pacore.backends import (
        Backend,
        BaseBackend,
        BreakerPolicy,
        Completion,
        GenerationParams,
        LlamaCppBackend,
        OpenAIBackend,
        RetryPolicy,
        RouterBackend,
        open_backend,
        register_backend,
    )
    from pacore.engine import asample
    from pacore.messages import compact
    from pacore.options import SolveOptions
    from pacore.prompts import SynthesisTemplate
    from pacore.schedule import PRESETS, Schedule
    from pacore.trace import (
        AnswerDelta,
        Confidence,
        Event,
        Final,
        Result,
        Round,
        RoundFinished,
        RoundStarted,
        Trajectory,
        TrajectoryFinished,
        TrajectoryProgress,
        Usage,
    )

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AnswerDelta",
    "Backend",
    "BackendError",
    "BaseBackend",
    "BreakerPolicy",
    "Completion",
    "ComputePolicy",
    "Confidence",
    "ContextOverflowError",
    "DatasetError",
    "DeadlineExceededError",
    "Event",
    "Final",
    "GenerationParams",
    "InputError",
    "LlamaCppBackend",
    "OpenAIBackend",
    "PacoreError",
    "Result",
    "RetryPolicy",
    "Round",
    "RoundFailedError",
    "RoundFinished",
    "RoundStarted",
    "RouterBackend",
    "Schedule",
    "ScheduleError",
    "SolveOptions",
    "StoreError",
    "SynthesisTemplate",
    "TemplateError",
    "Trajectory",
    "TrajectoryFinished",
    "TrajectoryProgress",
    "Usage",
    "UsageError",
    "__version__",
    "asample",
    "asolve",
    "compact",
    "iter_solve",
    "open_backend",
    "register_backend",
    "solve",
]


# The public names (the errors above excepted) by the module each comes from. Each is imported on first
# use, so ``import pacore`` (and with it every ``pacore`` command) pays for the engine, pydantic and jinja2
# only once something uses them.
__getattr__ = lazy_attributes(
    __name__,
    {
        "pacore.adaptive": ("ComputePolicy",),
        "pacore.api": ("asolve", "iter_solve", "solve"),
        "pacore.backends": (
            "Backend", "BaseBackend", "BreakerPolicy", "Completion", "GenerationParams", "LlamaCppBackend",
            "OpenAIBackend", "RetryPolicy", "RouterBackend", "open_backend", "register_backend",
        ),
        "pacore.engine": ("asample",),
        "pacore.messages": ("compact",),
        "pacore.options": ("SolveOptions",),
        "pacore.prompts": ("SynthesisTemplate",),
        "pacore.schedule": ("PRESETS", "Schedule"),
        "pacore.trace": (
            "AnswerDelta", "Confidence", "Event", "Final", "Result", "Round", "RoundFinished", "RoundStarted",
            "Trajectory", "TrajectoryFinished", "TrajectoryProgress", "Usage",
        ),
    },
)  # fmt: skip
