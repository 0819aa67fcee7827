"""Scale-out: one backend made of several endpoints serving the same model.

Each call goes to the member with the fewest samples outstanding (a call of
``n`` samples counts ``n``: it keeps a server ``n`` times as busy), ties going
round-robin, so a slow or saturated endpoint gets fewer new calls. An
``n``-batched call stays whole on one member, which is why the router's
``max_n`` is the smallest of its members'.

Failures: a member that keeps failing is taken out of rotation by a circuit
breaker (see :class:`BreakerPolicy`) and probed back in. A call that fails on
one member for a transient reason (unreachable, timeout, 429/5xx, malformed
answer) is retried at once on another member in rotation; the member itself
skips its own retries then, and only the last member tried retries as its
retry policy says.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from pacore.backends import base
from pacore.errors import BackendError, UsageError

logger = logging.getLogger(__name__)

#: Failures worth another endpoint: the next one may well answer.
FAILOVER_KINDS = frozenset({"connect", "timeout", "status", "protocol"})


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a member is taken out of rotation and how it is probed back in.

    After ``failures`` consecutive calls that could not reach the member, timed
    out or got an HTTP 5xx, it is *open*: it gets no calls for ``cooldown_s``.
    Then it is *half-open*: the next call to it is a probe, and no other call
    goes to it meanwhile. A success closes it; a failed probe opens it again
    for twice the previous cool-down, at most ``max_cooldown_s``. A 429, a
    malformed answer or a refused request neither counts nor resets the count.
    When every member is open, calls go to the one due back soonest rather
    than being refused.
    """

    failures: int = 5
    cooldown_s: float = 5.0
    max_cooldown_s: float = 60.0

    def __post_init__(self) -> None:
        if self.failures < 1 or self.cooldown_s <= 0 or self.max_cooldown_s < self.cooldown_s:
            raise UsageError(f"invalid breaker policy {self}: need failures >= 1 and 0 < cooldown_s <= max_cooldown_s")


def _breaks(error: BackendError) -> bool:
    """Whether ``error`` says the endpoint itself is in trouble."""
    if error.kind in ("connect", "timeout"):
        return True
    return error.kind == "status" and (error.status_code is None or error.status_code >= 500)


class _Circuit:
    """One member's breaker state."""

    __slots__ = ("failures", "open_until", "cooldown_s", "probing")

    def __init__(self, cooldown_s: float) -> None:
        self.failures = 0
        #: ``None`` while closed; else when the member may be probed.
        self.open_until: float | None = None
        self.cooldown_s = cooldown_s
        self.probing = False

    def available(self, now: float) -> bool:
        return self.open_until is None or (now >= self.open_until and not self.probing)

    def state(self, now: float) -> str:
        if self.open_until is None:
            return "closed"
        return "half-open" if now >= self.open_until else "open"


class RouterBackend(base.BaseBackend):
    """Least-outstanding-requests routing over ``backends``, with a circuit breaker per member.

    ``clock`` (seconds, monotonic) is replaceable for tests.
    """

    def __init__(
        self,
        backends: Sequence[base.Backend],
        breaker: BreakerPolicy = BreakerPolicy(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not backends:
            raise UsageError("a router needs at least one backend")
        self.backends = list(backends)
        #: Samples in progress on each member, in the order of ``backends``.
        self.outstanding = [0] * len(self.backends)
        self.breaker = breaker
        self._circuits = [_Circuit(breaker.cooldown_s) for _ in self.backends]
        # Members whose circuit is not closed; while 0, routing skips the breaker entirely.
        self._not_closed = 0
        self._clock = clock
        self._next = 0
        # Members whose generate takes on_progress, on_confidence (by id: members need not be hashable).
        self._with_progress = {id(backend) for backend in self.backends if base.accepts_progress(backend)}
        self._with_confidence = {id(backend) for backend in self.backends if base.accepts_confidence(backend)}

    # Members may learn their model and ``max_n`` on their first call, so
    # these are read from them each time rather than copied once.
    @property
    def name(self) -> str:  # type: ignore[override]
        return f"router of {len(self.backends)}: " + ", ".join(b.name for b in self.backends)

    @property
    def model(self) -> str:  # type: ignore[override]
        return next((b.model for b in self.backends if b.model), "")

    @property
    def max_n(self) -> int:  # type: ignore[override]
        return min(b.max_n for b in self.backends)

    def circuit_states(self) -> list[str]:
        """Each member's breaker state: ``"closed"``, ``"open"`` or ``"half-open"``."""
        now = self._clock()
        return [circuit.state(now) for circuit in self._circuits]

    def pick(self, exclude: Collection[int] = ()) -> int:
        """Index of the member the next call goes to (members in ``exclude`` only if nothing else is left)."""
        count = len(self.backends)
        now = self._clock() if self._not_closed else 0.0
        best = -1
        for offset in range(count):
            candidate = (self._next + offset) % count
            if candidate in exclude or (self._not_closed and not self._circuits[candidate].available(now)):
                continue
            if best < 0 or self.outstanding[candidate] < self.outstanding[best]:
                best = candidate
        if best < 0:
            # Nothing in rotation: try the member due back soonest rather than refuse the call.
            left = [i for i in range(count) if i not in exclude] or list(range(count))
            best = min(left, key=lambda i: self._circuits[i].open_until or 0.0)
        self._next = (best + 1) % count
        return best

    def _can_fail_over(self, error: BackendError, tried: Collection[int]) -> bool:
        if error.kind not in FAILOVER_KINDS:
            return False
        now = self._clock()
        return any(i not in tried and c.available(now) for i, c in enumerate(self._circuits))

    async def _route(
        self, call: Callable[[base.Backend], Awaitable[list[base.Completion]]], n: int, delivered: Callable[[], bool]
    ) -> list[base.Completion]:
        """Run ``call`` on a member, failing over to others while the failure is transient.

        The failures that were failed over are listed first in each completion's ``failed_attempts``.
        """
        tried: list[int] = []
        failed_over: list[str] = []
        while True:
            member = self.pick(tried)
            tried.append(member)
            circuit = self._circuits[member]
            probe = circuit.open_until is not None
            circuit.probing = circuit.probing or probe
            self.outstanding[member] += n
            hook = base.retry_elsewhere.set(lambda error: not delivered() and self._can_fail_over(error, tried))
            try:
                result = await call(self.backends[member])
            except BackendError as error:
                self._record(member, error, probe)
                if delivered() or not self._can_fail_over(error, tried):
                    raise
                failed_over.append(error.label)
                logger.info("%s failed (%s); trying another endpoint", self.backends[member].name, error)
            else:
                self._record(member, None, probe)
                if failed_over:
                    for completion in result:
                        completion.failed_attempts = (*failed_over, *completion.failed_attempts)
                return result
            finally:
                base.retry_elsewhere.reset(hook)
                self.outstanding[member] -= n
                if probe:
                    circuit.probing = False  # also when the probe was cancelled

    def _record(self, member: int, error: BackendError | None, probe: bool) -> None:
        circuit = self._circuits[member]
        if error is None:
            if circuit.open_until is not None:
                self._not_closed -= 1
                logger.info("%s is back in rotation", self.backends[member].name)
            circuit.failures, circuit.open_until = 0, None
            circuit.cooldown_s = self.breaker.cooldown_s
            return
        if not _breaks(error):
            return
        circuit.failures += 1
        if probe and circuit.open_until is not None:
            circuit.cooldown_s = min(2 * circuit.cooldown_s, self.breaker.max_cooldown_s)
        elif circuit.open_until is not None or circuit.failures < self.breaker.failures:
            return  # already out of rotation (calls that started before), or not yet enough
        else:
            self._not_closed += 1
        circuit.open_until = self._clock() + circuit.cooldown_s
        logger.info(
            "%s out of rotation for %gs after %d failures in a row (%s)",
            self.backends[member].name, circuit.cooldown_s, circuit.failures, error,
        )  # fmt: skip

    async def _generate(
        self, messages: Sequence[base.Message], n: int, params: base.GenerationParams, listeners: base.Listeners
    ) -> list[base.Completion]:
        def call(backend: base.Backend) -> Awaitable[list[base.Completion]]:
            # Only the callbacks a member takes (third-party backends may predate them).
            callbacks: dict[str, Any] = {}
            if listeners.on_progress is not None and id(backend) in self._with_progress:
                callbacks["on_progress"] = listeners.on_progress
            if listeners.on_confidence is not None and id(backend) in self._with_confidence:
                callbacks["on_confidence"] = listeners.on_confidence
            return backend.generate(messages, n, params, **callbacks)

        return await self._route(call, n, lambda: False)

    async def stream(
        self, messages: Sequence[base.Message], params: base.GenerationParams, on_delta: base.DeltaCallback
    ) -> base.Completion:
        relayed = False

        def relay(content: str, reasoning: str) -> None:
            nonlocal relayed
            relayed = True
            on_delta(content, reasoning)

        async def one_stream(backend: base.Backend) -> list[base.Completion]:
            return [await backend.stream(messages, params, relay)]

        # Deltas already delivered cannot be taken back: a stream fails over only before its first.
        (completion,) = await self._route(one_stream, 1, lambda: relayed)
        return completion

    async def aclose(self) -> None:
        """Close every member, then raise the first failure, if any."""
        outcomes = await asyncio.gather(*(b.aclose() for b in self.backends), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
