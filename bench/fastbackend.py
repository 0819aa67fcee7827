"""A fast OpenAI-compatible chat server for loopback benchmarks.

It stands in for a GPU inference server: every call waits a configurable
time to first token, then "generates" ``--completion-tokens`` tokens at
``--tokens-per-s`` per stream (0 = instantly), streamed as server-sent
events (``n`` > 1 included, choices interleaved by ``index`` as vLLM does)
or not, with ``n`` samples per call supported, ignored or refused, and
``stream`` honoured, ignored or refused (``--stream-support``). ``--concurrency`` caps the
samples an endpoint works on at once (later ones queue, first come first
served), which models an endpoint that is the bottleneck; ``--endpoints N``
listens on N ports in one process, each with its own cap.

The HTTP/1.1 keep-alive server is written on ``asyncio.Protocol`` directly
and answers an undelayed, unstreamed call without creating a task, so that
the client under test, not this server, is what a benchmark measures.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /stats``
(calls and samples served, peak samples in progress, faults injected).

``--faults SPEC --fault-seed N`` makes a share of the chat calls fail the ways
real servers do under load (5xx, 429 with ``Retry-After``, hangs, resets,
malformed or truncated answers, an endpoint that is down), deterministically
by seed; ``bench/faults.py`` lists the kinds. ``--api-key KEY`` makes the
endpoints require that bearer key (a wrong one gets a 401 quoting it, as some
hosted APIs do).

Usage::

    python bench/fastbackend.py --ttft-ms 50 --tokens-per-s 200 --endpoints 2

prints one ``http://127.0.0.1:PORT/v1`` line per endpoint, then ``ready``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

from faults import KINDS, FaultPlan, FaultSpecError, inject, parse_spec

NSupport = Literal["on", "ignore", "reject"]
StreamSupport = Literal["on", "ignore", "reject"]

# Short common words: a completion of N tokens is N of these, space separated.
_VOCABULARY = ("the", "answer", "is", "so", "we", "check", "each", "case", "and", "get")
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}
_MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How an endpoint behaves; the same for every call."""

    ttft_s: float = 0.0
    #: Tokens per second of each stream; 0 means the whole completion at once.
    tokens_per_s: float = 0.0
    completion_tokens: int = 32
    n_support: NSupport = "on"
    #: Whether ``stream: true`` is honoured, ignored (a plain JSON answer) or refused (HTTP 400).
    stream_support: StreamSupport = "on"
    #: Most samples in progress at once; 0 means unlimited.
    concurrency: int = 0
    #: Tokens per streamed chunk (real servers send one).
    chunk_tokens: int = 1
    model: str = "fast"

    def generation_s(self, tokens: int) -> float:
        return tokens / self.tokens_per_s if self.tokens_per_s > 0 else 0.0


@dataclass(slots=True)
class ChatRequest:
    model: str
    n: int
    stream: bool
    include_usage: bool
    max_tokens: int | None
    prompt_tokens: int


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes


def _completion_text(tokens: int) -> str:
    return " ".join(_VOCABULARY[i % len(_VOCABULARY)] for i in range(tokens))


class _Slots:
    """A first-come-first-served counting semaphore taken ``n`` slots at a time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self.waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, count: int) -> None:
        if not self.waiters and self.free >= count:
            self.free -= count
            return
        future = asyncio.get_running_loop().create_future()
        entry = (count, future)
        self.waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(count)  # granted just as the caller went away
            else:
                self.waiters.remove(entry)
            raise

    def release(self, count: int) -> None:
        self.free += count
        while self.waiters and self.waiters[0][0] <= self.free:
            granted, future = self.waiters.popleft()
            self.free -= granted
            future.set_result(None)


class Endpoint:
    """One listening port: its behaviour, its capacity and its counters."""

    def __init__(self, behaviour: Behaviour, faults: FaultPlan | None = None, api_key: str | None = None) -> None:
        self.behaviour = behaviour
        self.faults = faults
        self.api_key = api_key
        self.slots = _Slots(behaviour.concurrency) if behaviour.concurrency > 0 else None
        self.calls = 0
        self.samples = 0
        self.active = 0
        self.peak_active = 0
        self._ids = itertools.count(1)
        self._choices: dict[tuple[int, int, str], bytes] = {}
        self._deltas: dict[tuple[int, int], tuple[str, ...]] = {}
        self.model_list = json.dumps(
            {"object": "list", "data": [{"id": behaviour.model, "object": "model", "owned_by": "fastbackend"}]}
        ).encode()

    # --- parsing ------------------------------------------------------------

    def parse(self, body: bytes) -> ChatRequest | Reply:
        try:
            data = json.loads(body)
        except ValueError:
            return _error(400, "the request body is not valid JSON")
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list) or not data["messages"]:
            return _error(400, "'messages' must be a non-empty list")
        n = data.get("n") or 1
        if not isinstance(n, int) or n < 1:
            return _error(400, "'n' must be a positive integer")
        if n > 1 and self.behaviour.n_support == "reject":
            return _error(400, "this server supports only n=1")
        if self.behaviour.n_support == "ignore":
            n = 1
        stream = bool(data.get("stream"))
        if stream and self.behaviour.stream_support == "reject":
            return _error(400, "streaming is not supported")
        max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
        options = data.get("stream_options") or {}
        return ChatRequest(
            model=str(data.get("model") or self.behaviour.model),
            n=n,
            stream=stream and self.behaviour.stream_support == "on",
            include_usage=bool(options.get("include_usage")),
            max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
            prompt_tokens=max(1, len(body) // 4),
        )

    def length(self, request: ChatRequest) -> tuple[int, str]:
        tokens = self.behaviour.completion_tokens
        if request.max_tokens is not None and request.max_tokens < tokens:
            return request.max_tokens, "length"
        return tokens, "stop"

    def is_instant(self, request: ChatRequest) -> bool:
        b = self.behaviour
        return not request.stream and self.slots is None and b.ttft_s <= 0 and b.tokens_per_s <= 0

    # --- replies ------------------------------------------------------------

    async def respond(self, request: ChatRequest, transport: asyncio.Transport, keep_alive: bool) -> None:
        """Serve one chat call, waiting as the behaviour says (the fault-injection point)."""
        tokens, _ = self.length(request)
        if self.slots is not None:
            await self.slots.acquire(min(request.n, self.slots.size))
        self._start(request)
        try:
            if request.stream:
                await self._stream(request, transport, keep_alive)
            else:
                await asyncio.sleep(self.behaviour.ttft_s + self.behaviour.generation_s(tokens))
                transport.write(_http(200, self.completion(request), keep_alive))
        finally:
            self.active -= request.n
            if self.slots is not None:
                self.slots.release(min(request.n, self.slots.size))

    def _start(self, request: ChatRequest) -> None:
        self.calls += 1
        self.samples += request.n
        self.active += request.n
        self.peak_active = max(self.peak_active, self.active)

    def serve_instantly(self, request: ChatRequest) -> bytes:
        self._start(request)
        self.active -= request.n
        return self.completion(request)

    def completion(self, request: ChatRequest) -> bytes:
        tokens, finish = self.length(request)
        key = (request.n, tokens, finish)
        choices = self._choices.get(key)
        if choices is None:
            text = _completion_text(tokens)
            choices = self._choices[key] = json.dumps(
                [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                    for i in range(request.n)
                ]
            ).encode()
        usage = _usage(request.prompt_tokens, tokens * request.n)
        return b"".join(
            (
                b'{"id":"chatcmpl-%d","object":"chat.completion","created":%d,"model":'
                % (next(self._ids), int(time.time())),
                json.dumps(request.model).encode(),
                b',"choices":',
                choices,
                b',"usage":',
                usage,
                b"}",
            )
        )

    async def _stream(self, request: ChatRequest, transport: asyncio.Transport, keep_alive: bool) -> None:
        b = self.behaviour
        tokens, finish = self.length(request)
        head = b'{"id":"chatcmpl-%d","object":"chat.completion.chunk","created":%d,"model":%s,"choices":[' % (
            next(self._ids),
            int(time.time()),
            json.dumps(request.model).encode(),
        )
        transport.write(_STREAM_HEADERS_KEEP if keep_alive else _STREAM_HEADERS_CLOSE)
        await asyncio.sleep(b.ttft_s)
        first = b"".join(
            _event(head + b'{"index":%d,"delta":{"role":"assistant","content":""},"finish_reason":null}]}' % i)
            for i in range(request.n)
        )
        transport.write(first)
        step = max(1, b.chunk_tokens)
        pause = b.generation_s(step)
        for piece in self._delta_pieces(tokens, step):
            if pause:
                await asyncio.sleep(pause)
            content = json.dumps(piece).encode()
            transport.write(
                b"".join(
                    _event(head + b'{"index":%d,"delta":{"content":%s},"finish_reason":null}]}' % (i, content))
                    for i in range(request.n)
                )
            )
        tail = [
            _event(head + b'{"index":%d,"delta":{},"finish_reason":"%s"}]}' % (i, finish.encode()))
            for i in range(request.n)
        ]
        if request.include_usage:
            usage = _usage(request.prompt_tokens, tokens * request.n)
            tail.append(_event(head[: head.rindex(b'"choices":[')] + b'"choices":[],"usage":' + usage + b"}"))
        tail.append(_event(b"[DONE]"))
        tail.append(b"0\r\n\r\n")
        transport.write(b"".join(tail))

    def _delta_pieces(self, tokens: int, step: int) -> tuple[str, ...]:
        key = (tokens, step)
        pieces = self._deltas.get(key)
        if pieces is None:
            words = _completion_text(tokens).split(" ") if tokens else []
            pieces = self._deltas[key] = tuple(
                (" " if start else "") + " ".join(words[start : start + step])
                for start in range(0, len(words), step)
            )
        return pieces

    def stats(self) -> bytes:
        return json.dumps(
            {
                "calls": self.calls, "samples": self.samples, "active": self.active, "peak_active": self.peak_active,
                "faults": dict(self.faults.injected) if self.faults else {},
            }
        ).encode()  # fmt: skip


def _usage(prompt_tokens: int, completion_tokens: int) -> bytes:
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (
        prompt_tokens,
        completion_tokens,
        prompt_tokens + completion_tokens,
    )


def _event(data: bytes) -> bytes:
    """One server-sent event framed as one HTTP chunk."""
    payload = b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(payload), payload)


_STREAM_HEADERS_KEEP = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_STREAM_HEADERS_CLOSE = _STREAM_HEADERS_KEEP[:-2] + b"connection: close\r\n\r\n"


def _http(status: int, body: bytes, keep_alive: bool) -> bytes:
    return b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        status,
        _REASONS.get(status, b"Error"),
        len(body),
        b"" if keep_alive else b"connection: close\r\n",
        body,
    )


def _error(status: int, message: str) -> Reply:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})
    return Reply(status, body.encode())


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are answered in order."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is None:
            self._process()

    def _process(self) -> None:
        """Answer every complete request in the buffer, until one needs to wait."""
        while self.transport is not None and self.task is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEADER_BYTES:
                    self._finish(_error(400, "headers too large"), False)
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            method, _, rest = head[0].partition(" ")
            path, _, version = rest.partition(" ")
            length = 0
            keep_alive = version == "HTTP/1.1"
            authorization = ""
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value) if value.strip().isdigit() else -1
                elif name == "connection":
                    keep_alive = value.strip().lower() != "close"
                elif name == "authorization":
                    authorization = value.strip()
            if length < 0:
                self._finish(_error(400, "bad content-length"), False)
                return
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            self._dispatch(method, path, body, keep_alive, authorization)

    def _dispatch(self, method: str, path: str, body: bytes, keep_alive: bool, authorization: str = "") -> None:
        endpoint = self.endpoint
        path = path.partition("?")[0]
        if endpoint.api_key is not None and path != "/stats" and authorization != f"Bearer {endpoint.api_key}":
            presented = authorization.removeprefix("Bearer ") or "none"
            self._finish(_error(401, f"Incorrect API key provided: {presented}"), keep_alive)
        elif path in ("/v1/chat/completions", "/chat/completions"):
            if method != "POST":
                self._finish(_error(405, "use POST"), keep_alive)
                return
            request = endpoint.parse(body)
            if isinstance(request, Reply):
                self._finish(request, keep_alive)
            elif endpoint.faults is not None and (fault := endpoint.faults.draw()) is not None:
                self.task = asyncio.get_running_loop().create_task(self._fault(fault, request, keep_alive))
            elif endpoint.is_instant(request):
                self._finish(Reply(200, endpoint.serve_instantly(request)), keep_alive)
            else:
                self.task = asyncio.get_running_loop().create_task(self._respond(request, keep_alive))
        elif path in ("/v1/models", "/models") and method == "GET":
            self._finish(Reply(200, endpoint.model_list), keep_alive)
        elif path == "/stats" and method == "GET":
            self._finish(Reply(200, endpoint.stats()), keep_alive)
        else:
            self._finish(_error(404, f"no route {method} {path}"), keep_alive)

    async def _respond(self, request: ChatRequest, keep_alive: bool) -> None:
        assert self.transport is not None
        await self.endpoint.respond(request, self.transport, keep_alive)
        self.task = None
        self._after(keep_alive)

    async def _fault(self, kind: str, request: ChatRequest, keep_alive: bool) -> None:
        assert self.transport is not None and self.endpoint.faults is not None
        answer = self.endpoint.completion(request)
        in_order = await inject(kind, self.endpoint.faults, self.transport, answer, request.stream, keep_alive)
        self.task = None
        if in_order:
            self._after(keep_alive)
        else:
            self.transport = None  # the fault closed the connection

    def _finish(self, reply: Reply, keep_alive: bool) -> None:
        assert self.transport is not None
        self.transport.write(_http(reply.status, reply.body, keep_alive))
        self._after(keep_alive)

    def _after(self, keep_alive: bool) -> None:
        if self.transport is None:
            return
        if not keep_alive:
            self.transport.close()
            self.transport = None
        elif self.buffer:
            self._process()


async def serve(
    behaviour: Behaviour,
    endpoints: int = 1,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: dict[str, float] | None = None,
    fault_seed: int = 0,
    retry_after_s: float = 1.0,
    api_key: str | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for i in range(endpoints):
        plan = FaultPlan(faults, fault_seed, i, retry_after_s) if faults else None
        endpoint = Endpoint(behaviour, plan, api_key)
        server = await loop.create_server(
            lambda endpoint=endpoint: _Connection(endpoint),
            host,
            port + i if port else 0,
            backlog=4096,
            reuse_address=True,
        )
        servers.append(server)
        print(f"http://{host}:{server.sockets[0].getsockname()[1]}/v1", flush=True)
    print("ready", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="first port (default: any free port)")
    parser.add_argument("--endpoints", type=int, default=1, help="ports to listen on, each with its own cap")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="per stream; 0 = instant")
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--n-support", choices=("on", "ignore", "reject"), default="on")
    parser.add_argument("--stream-support", choices=("on", "ignore", "reject"), default="on")
    parser.add_argument("--concurrency", type=int, default=0, help="samples in progress per endpoint; 0 = no cap")
    parser.add_argument("--chunk-tokens", type=int, default=1, help="tokens per streamed chunk")
    parser.add_argument("--model", default="fast")
    parser.add_argument(
        "--faults", metavar="SPEC", default="",
        help=f"KIND:RATE,... or all:RATE; kinds: {', '.join(KINDS)} (see bench/faults.py)",
    )  # fmt: skip
    parser.add_argument("--fault-seed", type=int, default=0, help="seed of the fault draws")
    parser.add_argument("--fault-retry-after", type=float, default=1.0, help="Retry-After seconds of a 429 fault")
    parser.add_argument("--api-key", help="require this bearer key")
    args = parser.parse_args(argv)
    try:
        faults = parse_spec(args.faults)
    except FaultSpecError as exc:
        parser.error(str(exc))
    behaviour = Behaviour(
        ttft_s=args.ttft_ms / 1000,
        tokens_per_s=args.tokens_per_s,
        completion_tokens=args.completion_tokens,
        n_support=args.n_support,
        stream_support=args.stream_support,
        concurrency=args.concurrency,
        chunk_tokens=args.chunk_tokens,
        model=args.model,
    )
    asyncio.run(
        serve(
            behaviour, args.endpoints, args.host, args.port, faults, args.fault_seed, args.fault_retry_after,
            args.api_key,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
