"""Scale-out: one backend made of several endpoints serving the same model.

Each call goes to the member with the fewest samples outstanding (a call of
``n`` samples counts ``n``: it keeps a server ``n`` times as busy), ties going
round-robin, so a slow or saturated endpoint gets fewer new calls. An
``n``-batched call stays whole on one member, which is why the router's
``max_n`` is the smallest of its members'.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pacore.backends.base import Backend, BaseBackend, Completion, DeltaCallback, GenerationParams, Message
from pacore.errors import UsageError


class RouterBackend(BaseBackend):
    """Least-outstanding-requests routing over ``backends``."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        if not backends:
            raise UsageError("a router needs at least one backend")
        self.backends = list(backends)
        #: Samples in progress on each member, in the order of ``backends``.
        self.outstanding = [0] * len(self.backends)
        self._next = 0

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

    def pick(self) -> int:
        """Index of the member the next call goes to."""
        count = len(self.backends)
        best = self._next
        for offset in range(1, count):
            candidate = (self._next + offset) % count
            if self.outstanding[candidate] < self.outstanding[best]:
                best = candidate
        self._next = (best + 1) % count
        return best

    async def generate(
        self, messages: Sequence[Message], n: int, params: GenerationParams
    ) -> list[Completion]:
        member = self.pick()
        self.outstanding[member] += n
        try:
            return await self.backends[member].generate(messages, n, params)
        finally:
            self.outstanding[member] -= n

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams, on_delta: DeltaCallback
    ) -> Completion:
        member = self.pick()
        self.outstanding[member] += 1
        try:
            return await self.backends[member].stream(messages, params, on_delta)
        finally:
            self.outstanding[member] -= 1

    async def aclose(self) -> None:
        """Close every member, then raise the first failure, if any."""
        outcomes = await asyncio.gather(*(b.aclose() for b in self.backends), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
