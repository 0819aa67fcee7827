"""A scripted backend for unit tests of logic and for fault injection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pacore.backends.base import BaseBackend, Completion, GenerationParams, Message, text_of
from pacore.errors import BackendError

Reply = str | Completion | BaseException
Responder = Callable[["Call", int], Reply]


@dataclass
class Call:
    """One ``generate`` call as the backend received it."""

    messages: list[Message]
    n: int
    params: GenerationParams
    number: int

    @property
    def last_user_text(self) -> str:
        return text_of([m for m in self.messages if m["role"] == "user"][-1]["content"])


@dataclass
class ScriptedBackend(BaseBackend):
    """Replies with ``respond(call, sample_index)``; records every call.

    A reply may be text, a full :class:`Completion`, or an exception to raise
    (a ``BackendError`` fails the whole call; any reply that is a Completion
    with ``error`` set fails only that sample).
    """

    respond: Responder = lambda call, i: f"answer {call.number}.{i}"
    max_n: int = 1
    delay: float = 0.0
    model: str = "scripted"
    name: str = "scripted"
    calls: list[Call] = field(default_factory=list)

    async def generate(
        self, messages: Sequence[Message], n: int, params: GenerationParams
    ) -> list[Completion]:
        call = Call(list(messages), n, params, len(self.calls))
        self.calls.append(call)
        if self.delay:
            await asyncio.sleep(self.delay)
        out: list[Completion] = []
        for i in range(n):
            reply = self.respond(call, i)
            if isinstance(reply, BaseException):
                raise reply
            if isinstance(reply, str):
                reply = Completion(
                    text=reply,
                    finish_reason="stop",
                    prompt_tokens=len(call.last_user_text.split()),
                    completion_tokens=len(reply.split()),
                    latency_s=0.001,
                )
            out.append(reply)
        return out

    @property
    def trajectories_requested(self) -> int:
        return sum(call.n for call in self.calls)


def fail(kind: str = "status", message: str = "HTTP 503 from backend") -> BackendError:
    return BackendError(message, kind=kind)  # type: ignore[arg-type]
