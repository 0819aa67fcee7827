"""Fault injection for ``bench/fastbackend.py``: the ways a model server fails under load.

A fault spec names kinds and the fraction of chat calls each one hits::

    500:0.05,429:0.05,hang:0.02,reset:0.02     # these kinds at these rates
    all:0.2                                     # 20% of calls, spread equally over every kind
    down:1                                      # every call: the endpoint is down entirely

Draws are deterministic: each endpoint draws from its own ``random.Random``
seeded with ``--fault-seed`` and its index, one draw per chat call in the
order calls arrive, so the same seed gives the same sequence of faults.
Only ``/chat/completions`` calls are faulted (not ``/models`` or ``/stats``).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
from collections import Counter
from typing import Any

#: Every kind, with what the server does when a call draws it.
KINDS: dict[str, str] = {
    "500": "HTTP 500 with an OpenAI-format error body",
    "502": "HTTP 502 with an OpenAI-format error body",
    "503": "HTTP 503 with an OpenAI-format error body",
    "429": "HTTP 429 with a Retry-After header",
    "hang": "reads the request and never answers, past any client timeout",
    "reset": "resets the connection (TCP RST) before sending a byte",
    "reset_mid": "sends the headers and half of the body (or stream), then resets the connection",
    "malformed": "HTTP 200 whose body is not JSON (a stream: a chunk that is not JSON)",
    "truncated": "the reply stops early: a stream ends cleanly before its finish reason, "
    "a plain reply closes the connection half way through its body",
    "no_choices": "HTTP 200 with valid JSON that has no choices",
    "no_usage": "HTTP 200 with a valid completion but no usage (the answer is usable)",
    "down": "closes the connection without a reply; at rate 1 the endpoint is down entirely",
}

_STATUS_REASONS = {
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    429: b"Too Many Requests",
}
# Lets the client read what was sent before a reset, so the reset comes mid-body.
_BEFORE_RESET_S = 0.05


class FaultSpecError(ValueError):
    """A ``--faults`` spec that cannot be parsed."""


def parse_spec(text: str) -> dict[str, float]:
    """``"500:0.05,hang:0.02"`` or ``"all:0.2"`` -> ``{kind: rate}``; rates must sum to at most 1."""
    rates: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, _, value = part.partition(":")
        name = name.strip().lower()
        try:
            rate = float(value)
        except ValueError:
            raise FaultSpecError(f"fault {part.strip()!r}: expected KIND:RATE, e.g. 503:0.05") from None
        if not 0 <= rate <= 1:
            raise FaultSpecError(f"fault {part.strip()!r}: the rate must be between 0 and 1")
        kinds = list(KINDS) if name == "all" else [name]
        if name not in KINDS and name != "all":
            raise FaultSpecError(f"unknown fault kind {name!r}: use all or one of {', '.join(KINDS)}")
        for kind in kinds:
            rates[kind] = rates.get(kind, 0.0) + rate / len(kinds)
    if sum(rates.values()) > 1 + 1e-9:
        raise FaultSpecError(f"fault rates add up to {sum(rates.values()):g}, more than 1")
    return {kind: rate for kind, rate in rates.items() if rate > 0}


class FaultPlan:
    """Which fault, if any, each chat call of one endpoint meets."""

    def __init__(self, rates: dict[str, float], seed: int, endpoint: int = 0, retry_after_s: float = 1.0) -> None:
        self.rates = rates
        self.retry_after_s = retry_after_s
        self.injected: Counter[str] = Counter()
        self._random = random.Random(f"pacore-faults:{seed}:{endpoint}")
        self._thresholds: list[tuple[float, str]] = []
        total = 0.0
        for kind, rate in rates.items():
            total += rate
            self._thresholds.append((total, kind))

    def draw(self) -> str | None:
        """The next call's fault, or ``None`` for a normal answer."""
        value = self._random.random()
        for threshold, kind in self._thresholds:
            if value < threshold:
                self.injected[kind] += 1
                return kind
        return None


async def inject(
    kind: str, plan: FaultPlan, transport: asyncio.Transport, completion: bytes, stream: bool, keep_alive: bool
) -> bool:
    """Answer one call with fault ``kind``; ``completion`` is the good answer's JSON.

    Returns whether the reply ended in good HTTP order, so the connection may
    go on as ``keep_alive`` says; else the fault has closed it.
    """
    if kind == "hang":
        await asyncio.Event().wait()  # until the client gives up and the connection is lost
    if kind in ("reset", "down"):
        _close(transport, reset=kind == "reset")
        return False
    if kind[0].isdigit():
        headers = {"retry-after": f"{plan.retry_after_s:g}"} if kind == "429" else {}
        transport.write(_status(int(kind), headers, keep_alive))
        return True
    good = json.loads(completion)
    if stream:
        return await _stream_fault(kind, good, transport, keep_alive)
    if kind == "no_choices":
        del good["choices"]
    elif kind == "no_usage":
        del good["usage"]
    body = json.dumps(good).encode()
    half = body[: len(body) // 2]
    if kind == "malformed":
        transport.write(_head(200, b"application/json", len(half), keep_alive) + half)
    elif kind in ("reset_mid", "truncated"):
        transport.write(_head(200, b"application/json", len(body), keep_alive) + half)
        await asyncio.sleep(_BEFORE_RESET_S)
        _close(transport, reset=kind == "reset_mid")
        return False
    else:
        transport.write(_head(200, b"application/json", len(body), keep_alive) + body)
    return True


async def _stream_fault(kind: str, good: dict[str, Any], transport: asyncio.Transport, keep_alive: bool) -> bool:
    """A server-sent event stream of ``good``'s text, one word a chunk, faulted as ``kind`` says."""
    base = {"id": good["id"], "object": "chat.completion.chunk", "created": good["created"], "model": good["model"]}
    words = good["choices"][0]["message"]["content"].split(" ")
    deltas = [{**base, "choices": [{"index": 0, "delta": {"content": (" " if i else "") + w}, "finish_reason": None}]}
              for i, w in enumerate(words)]  # fmt: skip
    finish = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": good["choices"][0]["finish_reason"]}]}
    events: list[bytes]
    if kind == "no_choices":
        events = [_event(json.dumps(base).encode()), _event(b"[DONE]")]
    elif kind == "malformed":
        events = [_event(json.dumps(deltas[0]).encode()), _event(b'{"choices": [{"delta": oops')]
    elif kind in ("truncated", "reset_mid"):
        events = [_event(json.dumps(delta).encode()) for delta in deltas[: max(1, len(deltas) // 2)]]
    else:  # no_usage: the whole stream, without the usage chunk it was asked for
        events = [_event(json.dumps(chunk).encode()) for chunk in (*deltas, finish)] + [_event(b"[DONE]")]
    headers = _head(200, b"text/event-stream", None, keep_alive)
    transport.write(headers + b"".join(events))
    if kind == "reset_mid":
        await asyncio.sleep(_BEFORE_RESET_S)
        _close(transport, reset=True)
        return False
    transport.write(b"0\r\n\r\n")  # a clean end of the chunked body, whatever came before
    return True


def _close(transport: asyncio.Transport, *, reset: bool) -> None:
    """Close the connection: with a TCP RST (``reset``) or a plain FIN."""
    sock = transport.get_extra_info("socket")
    if reset and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


def _head(status: int, content_type: bytes, length: int | None, keep_alive: bool) -> bytes:
    """Status line and headers; without ``length`` the body is chunked."""
    reason = b"OK" if status == 200 else _STATUS_REASONS.get(status, b"Error")
    framing = b"content-length: %d\r\n" % length if length is not None else b"transfer-encoding: chunked\r\n"
    close = b"" if keep_alive else b"connection: close\r\n"
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n%s%s\r\n" % (status, reason, content_type, framing, close)


def _status(status: int, headers: dict[str, str], keep_alive: bool) -> bytes:
    error = {"message": f"injected fault: HTTP {status}", "type": "server_error", "param": None, "code": None}
    body = json.dumps({"error": error}).encode()
    head = _head(status, b"application/json", len(body), keep_alive)
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()
    return head[:-2] + extra + b"\r\n" + body


def _event(data: bytes) -> bytes:
    """One server-sent event as one HTTP chunk."""
    payload = b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(payload), payload)
