"""A scripted backend for unit tests of logic and for fault injection."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pacore.backends.base import (
    BaseBackend,
    Completion,
    ConfidenceCallback,
    DeltaCallback,
    GenerationParams,
    Message,
    ProgressCallback,
    text_of,
)
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
    with ``error`` set fails only that sample). ``delay`` is seconds before
    replying, or a function of the call giving them; with a ``gate`` (a
    ``threading.Event``), calls (those ``held`` says, by default all) first wait
    until the test sets it, so what the test checks meanwhile does not race a
    clock. Calls cancelled while
    waiting are listed in ``cancelled``. ``on_progress`` hears each reply's
    words counted one by one, as a streaming server would send them;
    ``on_confidence`` hears a Completion reply's ``token_confidences`` one by one.
    """

    respond: Responder = lambda call, i: f"answer {call.number}.{i}"
    max_n: int = 1
    delay: float | Callable[[Call], float] = 0.0
    model: str = "scripted"
    name: str = "scripted"
    gate: threading.Event | None = None
    held: Callable[[Call], bool] = lambda call: True
    calls: list[Call] = field(default_factory=list)
    cancelled: list[Call] = field(default_factory=list)

    async def generate(
        self,
        messages: Sequence[Message],
        n: int,
        params: GenerationParams,
        on_progress: ProgressCallback | None = None,
        on_confidence: ConfidenceCallback | None = None,
    ) -> list[Completion]:
        call = Call(list(messages), n, params, len(self.calls))
        self.calls.append(call)
        wait = self.delay(call) if callable(self.delay) else self.delay
        try:
            if self.gate is not None and self.held(call):
                await _opened(self.gate)
            if wait:
                await asyncio.sleep(wait)
        except asyncio.CancelledError:
            self.cancelled.append(call)
            raise
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
            if on_progress is not None:
                for tokens in range(1, len(reply.text.split()) + 1):
                    on_progress(i, tokens)
            if on_confidence is not None:
                for confidence in reply.token_confidences or ():
                    on_confidence(i, (confidence,))
            out.append(reply)
        return out

    @property
    def trajectories_requested(self) -> int:
        return sum(call.n for call in self.calls)


GATE_TIMEOUT_S = 60.0


async def _opened(gate: threading.Event) -> None:
    """Until ``gate`` is set (from the test's thread: polled, not awaited)."""
    for _ in range(int(GATE_TIMEOUT_S / 0.005)):
        if gate.is_set():
            return
        await asyncio.sleep(0.005)
    raise RuntimeError(f"the test did not open the backend's gate within {GATE_TIMEOUT_S:g}s")


@dataclass
class StreamingScriptedBackend(ScriptedBackend):
    """A ScriptedBackend whose ``stream`` sends the reply one word at a time."""

    streamed: list[Call] = field(default_factory=list)
    #: Whether the event loop runs between two words; ``False``: the whole reply is sent in one step,
    #: so no timer (a deadline) can come part way, however slowly a loaded machine runs.
    interleaved: bool = True

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams, on_delta: DeltaCallback
    ) -> Completion:
        number = len(self.calls)
        (completion,) = await self.generate(messages, 1, params)
        self.streamed.append(self.calls[number])
        if completion.ok:
            for piece in re.split(r"(?<=\s)", completion.text):
                if piece:
                    on_delta(piece, "")
                    if self.interleaved:
                        await asyncio.sleep(0)
        return completion


def fail(kind: str = "status", message: str = "HTTP 503 from backend") -> BackendError:
    return BackendError(message, kind=kind)  # type: ignore[arg-type]
