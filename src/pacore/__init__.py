"""pacore: Parallel Coordinated Reasoning for any language model.

The whole public API::

    import pacore
    result = pacore.solve("How many primes are below 100?", schedule="low")
    print(result.answer, result.usage.completion_tokens)
"""

from pacore.backends import (
    Backend,
    BaseBackend,
    Completion,
    GenerationParams,
    RetryPolicy,
    open_backend,
    register_backend,
)
from pacore.engine import asolve, compact, iter_solve, solve
from pacore.errors import (
    BackendError,
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
from pacore.prompts import SynthesisTemplate
from pacore.schedule import PRESETS, Schedule
from pacore.trace import (
    AnswerDelta,
    Event,
    Final,
    Result,
    Round,
    RoundFinished,
    RoundStarted,
    Trajectory,
    TrajectoryFinished,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AnswerDelta",
    "Backend",
    "BackendError",
    "BaseBackend",
    "Completion",
    "DatasetError",
    "DeadlineExceededError",
    "Event",
    "Final",
    "GenerationParams",
    "InputError",
    "PacoreError",
    "Result",
    "RetryPolicy",
    "Round",
    "RoundFailedError",
    "RoundFinished",
    "RoundStarted",
    "Schedule",
    "ScheduleError",
    "StoreError",
    "SynthesisTemplate",
    "TemplateError",
    "Trajectory",
    "TrajectoryFinished",
    "Usage",
    "UsageError",
    "__version__",
    "asolve",
    "compact",
    "iter_solve",
    "open_backend",
    "register_backend",
    "solve",
]
