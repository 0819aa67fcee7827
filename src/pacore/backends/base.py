"""The backend protocol: the only thing the engine knows about models.

A backend turns one chat conversation into ``n`` sampled completions. Whether
it asks the server for ``n`` samples in one call, fans out ``n`` calls, or runs
a local model is its own business; the engine only reads ``max_n`` to decide
how to split a round into calls.

Progress: ``generate`` takes an optional ``on_progress`` callback that a
backend calls as tokens arrive (the HTTP backend on every streamed chunk,
the embedded model on every token); a backend that cannot tell may never
call it. The engine throttles what it makes of it.

Confidence: when ``params.top_logprobs`` is set, a backend asks its model for
that many alternatives' logprobs per token, passes each new token's DeepConf
confidence to the optional ``on_confidence`` callback and returns them all in
``Completion.token_confidences`` (``None`` when the model gave none: no error).

Failure contract: ``generate`` raises :class:`~pacore.errors.BackendError` when
the whole call failed, and may return completions with ``error`` set when only
some of the ``n`` samples failed. It always returns exactly ``n`` completions
otherwise. ``stream`` raises the same way before its first delta; a stream
that fails after deltas were delivered returns a failed completion holding
the partial text (what was shown cannot be taken back).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Self, TypeGuard, TypeVar, runtime_checkable

from pacore.errors import BackendError

# text_of is re-exported: it lived here first.
from pacore.messages import text_of  # noqa: F401
from pacore.trace import CallOutcome

Message = dict[str, Any]
"""An OpenAI-style chat message: ``{"role": ..., "content": str | list[part]}``."""

DeltaCallback = Callable[[str, str], None]
"""Called with ``(content_delta, reasoning_delta)`` while a completion streams."""

ProgressCallback = Callable[[int, int], None]
"""Called with ``(sample_index, tokens_so_far)`` as a sample of a ``generate`` call grows.

``sample_index`` counts from 0 within the call; ``tokens_so_far`` restarts
from 0 when a failed attempt is retried from scratch.
"""

ConfidenceCallback = Callable[[int, Sequence[float]], None]
"""Called with ``(sample_index, new_token_confidences)`` as a sample of a ``generate`` call
grows, when ``params.top_logprobs`` is set and the backend returns logprobs.

Each value is DeepConf's token confidence (see :func:`pacore.confidence.token_confidence`)
of one newly generated token, in order. The engine cancels the call to stop a sample early.
As with ``on_progress``, a failed attempt that is retried starts over from its first token.
"""


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Sampling settings for every call of a request (the report uses 1.0/1.0)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    #: Request token logprobs with this many alternatives per token (``None``: no logprobs).
    top_logprobs: int | None = None
    # Extra fields sent verbatim in the request body (e.g. top_k, min_p).
    extra: Mapping[str, Any] = field(default_factory=dict)

    def with_seed(self, seed: int | None) -> GenerationParams:
        return replace(self, seed=seed)


def offset_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample ``index`` of a call seeded ``seed``, so that samples differ (unseeded stays so)."""
    return None if seed is None else seed + index


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Which failures are retried, how long to wait between attempts, and how many retries in all.

    Retried: connection errors, timeouts, HTTP 408/409/425/429/5xx and
    malformed answers. Never retried: 400/401/403/404/422 (they would fail
    again). A call makes at most ``max_attempts`` attempts. The wait after
    failed attempt ``i`` (from 1) is ``min(backoff_max, backoff_base * 2**(i-1))``
    with full jitter, or the server's ``Retry-After`` when it sends one
    (capped at ``backoff_max``).

    Budget: all the calls of one request (one ``asolve`` or ``asample``)
    share ``budget_min + budget_ratio * calls`` retries, so a struggling
    server is not sent every call's retries at once; once the budget is
    spent, a failing call fails at its first error (a failed trajectory).
    """

    max_attempts: int = 4
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    retry_statuses: frozenset[int] = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
    budget_min: int = 10
    budget_ratio: float = 0.5

    def delay(self, attempt: int, retry_after: float | None, rand: float) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.backoff_max)
        return rand * min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))


class RetryBudget:
    """What one request's calls have spent of the retry budget (see :class:`RetryPolicy`)."""

    __slots__ = ("calls", "retries")

    def __init__(self) -> None:
        self.calls = 0
        self.retries = 0

    def spend(self, policy: RetryPolicy) -> bool:
        """Take one retry if ``policy`` allows another; ``False`` once the budget is spent."""
        if self.retries >= policy.budget_min + policy.budget_ratio * self.calls:
            return False
        self.retries += 1
        return True


#: The retry budget of the request being served; the engine opens one per request.
#: Backend calls made outside a request have none (only ``max_attempts`` applies).
current_retry_budget: ContextVar[RetryBudget | None] = ContextVar("pacore_retry_budget", default=None)

#: Set by a router around a call to one of its endpoints: given an attempt's
#: error, says whether another endpoint will take the call over, in which case
#: the endpoint's backend raises at once instead of retrying it itself.
retry_elsewhere: ContextVar[Callable[[BackendError], bool] | None] = ContextVar("pacore_retry_elsewhere", default=None)


class Completion(CallOutcome):
    """One sampled trajectory as the backend returned it (its fields shared with :class:`~pacore.trace.Trajectory`)."""

    #: DeepConf token confidence of every generated token, when logprobs were requested and returned.
    token_confidences: list[float] | None = None


@runtime_checkable
class Backend(Protocol):
    """What the engine needs from a model."""

    # Read-only properties: a plain attribute satisfies them, and so does a computed
    # property (RouterBackend's come from its members).
    @property
    def name(self) -> str:
        """Human-readable identity, e.g. ``"openai http://127.0.0.1:8080/v1 (qwen3-8b)"``."""
        ...

    @property
    def model(self) -> str:
        """The model name reported in results and sent to servers."""
        ...

    @property
    def max_n(self) -> int:
        """Most samples one ``generate`` call should be asked for; 1 means "no batching"."""
        ...

    # ``= ...``: the callbacks are optional; an implementation chooses its defaults.
    async def generate(
        self,
        messages: Sequence[Message],
        n: int,
        params: GenerationParams,
        on_progress: ProgressCallback | None = ...,
        on_confidence: ConfidenceCallback | None = ...,
    ) -> list[Completion]: ...

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams, on_delta: DeltaCallback
    ) -> Completion: ...

    async def aclose(self) -> None: ...


_BACKEND_CLASSES: set[type] = set()


def is_backend(value: object) -> TypeGuard[Backend]:
    """``isinstance(value, Backend)``, remembered per class: a protocol check looks up every member,
    tens of microseconds, and the engine asks on every request."""
    kind = type(value)
    if kind in _BACKEND_CLASSES:
        return True
    if isinstance(value, Backend):
        _BACKEND_CLASSES.add(kind)
        return True
    return False


def accepts_progress(backend: Backend) -> bool:
    """Whether ``backend.generate`` takes ``on_progress`` (backends written before it do not)."""
    return _generate_takes(backend, "on_progress")


def accepts_confidence(backend: Backend) -> bool:
    """Whether ``backend.generate`` takes ``on_confidence`` (backends written before it do not)."""
    return _generate_takes(backend, "on_confidence")


def _generate_takes(backend: Backend, keyword: str) -> bool:
    generate = backend.generate
    # Asked on every request; inspecting a signature takes tens of µs, so per function, once.
    return _takes(getattr(generate, "__func__", generate), keyword)


@functools.lru_cache(maxsize=256)
def _takes(function: Callable[..., Any], keyword: str) -> bool:
    try:
        return keyword in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


class Listeners:
    """The callbacks one ``generate`` call was given: ``on_progress`` and ``on_confidence``."""

    __slots__ = ("on_progress", "on_confidence")

    def __init__(
        self, on_progress: ProgressCallback | None = None, on_confidence: ConfidenceCallback | None = None
    ) -> None:
        self.on_progress = on_progress
        self.on_confidence = on_confidence

    def shifted(self, offset: int) -> Listeners:
        """The callbacks for a call whose sample 0 is sample ``offset`` of the caller's."""
        if offset == 0:
            return self
        return Listeners(_shifted(self.on_progress, offset), _shifted(self.on_confidence, offset))


_Value = TypeVar("_Value")


def _shifted(callback: Callable[[int, _Value], None] | None, offset: int) -> Callable[[int, _Value], None] | None:
    """``callback`` taking a sample index, for a call whose sample 0 is sample ``offset`` of the caller's."""
    if callback is None:
        return None
    return lambda index, value: callback(index + offset, value)


class BaseBackend:
    """Shared plumbing: ``generate`` over :meth:`_generate`, async context manager and a non-streaming ``stream``.

    A subclass implements :meth:`_generate` (or overrides ``generate`` itself).
    """

    name: str = "backend"
    model: str = "unknown"
    max_n: int = 1

    async def generate(
        self,
        messages: Sequence[Message],
        n: int,
        params: GenerationParams,
        on_progress: ProgressCallback | None = None,
        on_confidence: ConfidenceCallback | None = None,
    ) -> list[Completion]:
        return await self._generate(messages, n, params, Listeners(on_progress, on_confidence))

    async def _generate(
        self, messages: Sequence[Message], n: int, params: GenerationParams, listeners: Listeners
    ) -> list[Completion]:
        raise NotImplementedError

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams, on_delta: DeltaCallback
    ) -> Completion:
        """Fallback for backends that cannot stream: one delta with the whole text."""
        (completion,) = await self.generate(messages, 1, params)
        if completion.ok:
            on_delta(completion.text, completion.reasoning or "")
        return completion

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
