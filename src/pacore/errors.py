"""One exception hierarchy for everything pacore raises on purpose.

Front doors map these to their own vocabulary in exactly one place each:
exit codes in ``pacore.cli.main``, HTTP statuses in ``pacore.server``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pacore.trace import Result

BackendErrorKind = Literal[
    "connect",  # could not reach the server
    "timeout",  # no answer in time
    "status",  # HTTP 5xx / 429 (transient)
    "protocol",  # the answer was not a valid chat completion
    "auth",  # HTTP 401/403: wrong or missing API key
    "not_found",  # HTTP 404: unknown model or wrong URL
    "bad_request",  # HTTP 400/422: the backend refused the request itself
    "model",  # the embedded model failed to load or generate
    "context",  # the prompt does not fit the model's context window
    "too_large",  # the answer exceeded the backend's reply size limit
    "cancelled",
]

# Kinds that will fail the same way on every retry and every trajectory, so the
# engine stops the whole request instead of recording N identical failures.
FATAL_KINDS: frozenset[str] = frozenset({"auth", "not_found", "bad_request", "model"})


def shorten(text: str, limit: int = 40) -> str:
    """Echo user input in an error message without flooding the line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PacoreError(Exception):
    """Base class of every error pacore raises on purpose.

    When a request fails part way, ``result`` holds the partial trace (the
    rounds computed before the failure), so nothing already computed is lost.
    """

    result: Result | None = None


class UsageError(PacoreError, ValueError):
    """The caller asked for something invalid (bad argument, empty prompt...)."""


class MissingExtraError(UsageError):
    """A feature needs an optional dependency group (``pip install 'pacore[extra]'``) that is not installed."""


class ScheduleError(UsageError):
    """A schedule string or list is not a valid K-vector."""


class TemplateError(UsageError):
    """The synthesis template cannot be read or rendered."""


class InputError(UsageError):
    """A prompt, message list or attached file is unusable."""


class OutputError(UsageError):
    """An output path cannot be used: it names an input, a directory, or nothing."""


class DatasetError(UsageError):
    """A data set file is missing or a line has an unknown shape."""


class DownloadError(PacoreError):
    """A data set download failed: unreachable, refused, too large, or a checksum mismatch."""


class StoreError(PacoreError):
    """A run directory cannot be used (locked, other method, corrupt...)."""


class StoreUnusableError(StoreError, UsageError):
    """The run database cannot be used as it is: damaged, not a database, read-only, or from a newer pacore."""


class RunConflictError(StoreError, UsageError):
    """The command does not fit the run directory (other data set or options, no run there)."""


class BackendError(PacoreError):
    """A model backend call failed; ``kind`` says how."""

    def __init__(
        self,
        message: str,
        *,
        kind: BackendErrorKind,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status_code = status_code
        self.retry_after = retry_after

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL_KINDS

    @property
    def label(self) -> str:
        """The kind, with the HTTP status when there is one: ``"status 503"``."""
        return f"{self.kind} {self.status_code}" if self.status_code else self.kind


class ContextOverflowError(BackendError):
    """The server refused a call because prompt plus ``max_tokens`` exceed its context.

    ``context_tokens`` and ``prompt_tokens`` are what the server's message
    said, when it said them.
    """

    def __init__(self, message: str, *, context_tokens: int | None = None, prompt_tokens: int | None = None) -> None:
        super().__init__(message, kind="context", status_code=400)
        self.context_tokens = context_tokens
        self.prompt_tokens = prompt_tokens


class RoundFailedError(PacoreError):
    """Too few trajectories of a round succeeded to go on."""


class DeadlineExceededError(RoundFailedError):
    """The request's deadline passed before the final answer."""


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real error of a task group's failure (a cancellation only if nothing else)."""
    import asyncio  # here: every ``pacore`` command imports this module, most never start an event loop

    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
