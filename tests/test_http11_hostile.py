"""A hostile pass on the lean HTTP/1.1 transport: exact bytes from raw loopback servers, compared with httpx's own.

Every answer below is sent byte for byte by a server written here; the lean
transport must end the same way httpx's own transport does (the same body,
or an httpx error), never hang and never return a truncated body as success.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from harness import fast_backend
from pacore.backends import http11
from pacore.backends.base import GenerationParams, RetryPolicy
from pacore.backends.http11 import MAX_HEAD_BYTES, LeanTransport
from pacore.backends.openai_http import OpenAIBackend
from pacore.errors import BackendError
from test_http11 import CHUNKED_HEAD, Handler, chunked, raw_server, read_request

LIMIT_S = 10  # no test waits longer: a hang fails fast
#: A read timeout that must fire against a silent server, yet never against one that answers at once:
#: 2 s leaves a loaded machine's stalls far behind it, and the silent servers stay silent for ever.
READ_TIMEOUT_S = 2
SILENT_S = 3600
MESSAGES = [{"role": "user", "content": "What is 2+3?"}]
PARAMS = GenerationParams(max_tokens=16)

Outcome = bytes | type[BaseException]


def serving(handler: Handler) -> contextlib.AbstractAsyncContextManager[str]:
    """``raw_server``, its handlers still waiting when a test ends cancelled quietly (not logged as errors)."""

    async def quiet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await handler(reader, writer)

    return raw_server(quiet)


NumberedHandler = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Connections:
    """A raw server's handler that numbers its connections: ``handler(number, reader, writer)``, 1 for the first."""

    def __init__(self, handler: NumberedHandler) -> None:
        self.handler = handler
        self.count = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.count += 1
        await self.handler(self.count, reader, writer)


@contextlib.asynccontextmanager
async def lean_client(
    handler: Handler, timeout: float | httpx.Timeout = 2
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client on the lean transport, and the URL of the raw server ``handler`` answers."""
    async with serving(handler) as url, httpx.AsyncClient(transport=LeanTransport(), timeout=timeout) as client:
        yield client, url


async def post(client: httpx.AsyncClient, url: str) -> httpx.Response:
    return await asyncio.wait_for(client.post(url + "/", content=b"x"), LIMIT_S)


async def outcome(make: Callable[[], httpx.AsyncBaseTransport], pieces: list[bytes], timeout: float = 2) -> Outcome:
    """The body a client reads when a server sends ``pieces`` (each its own TCP write) then closes, or its error."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.002)  # a separate read on the client's side
        writer.close()

    return await outcome_of(handler, make, timeout)


async def outcome_of(handler: Handler, make: Callable[[], httpx.AsyncBaseTransport], timeout: float = 2) -> Outcome:
    """The body a client on ``make()``'s transport reads from the raw server ``handler`` answers, or its error."""
    async with serving(handler) as url, httpx.AsyncClient(transport=make(), timeout=timeout) as client:
        try:
            return await asyncio.wait_for(_body(client, url), LIMIT_S)
        except httpx.HTTPError as exc:
            return type(exc)


async def _body(client: httpx.AsyncClient, url: str) -> bytes:
    async with client.stream("POST", url + "/", content=b"x") as response:
        return b"".join([piece async for piece in response.aiter_bytes()])


async def both(pieces: list[bytes]) -> tuple[Outcome, Outcome]:
    return await outcome(LeanTransport, pieces), await outcome(httpx.AsyncHTTPTransport, pieces)


OK = b"HTTP/1.1 200 OK\r\n"
SAME = [
    # chunked bodies
    ("chunk extension", [CHUNKED_HEAD + b"5;foo=bar\r\nhello\r\n0\r\n\r\n"], b"hello"),
    ("quoted extension", [CHUNKED_HEAD + b'5;a="x;y"\r\nhello\r\n0;end=1\r\n\r\n'], b"hello"),
    ("upper hex", [CHUNKED_HEAD + b"A\r\n0123456789\r\n0\r\n\r\n"], b"0123456789"),
    ("lower hex", [CHUNKED_HEAD + b"a\r\n0123456789\r\n0\r\n\r\n"], b"0123456789"),
    ("trailers", [CHUNKED_HEAD + b"2\r\nok\r\n0\r\nX-Checksum: 1\r\nX-Other: 2\r\n\r\n"], b"ok"),
    ("size line split", [CHUNKED_HEAD + b"1", b"0\r", b"\n0123456789abcdef", b"\r", b"\n0\r", b"\n\r\n"], None),
    ("huge chunk size", [CHUNKED_HEAD + b"ffffffffffffffffffff\r\nhello"], httpx.RemoteProtocolError),
    ("negative chunk size", [CHUNKED_HEAD + b"-5\r\nhello\r\n0\r\n\r\n"], httpx.RemoteProtocolError),
    ("garbage chunk size", [CHUNKED_HEAD + b"5g\r\nhello\r\n0\r\n\r\n"], httpx.RemoteProtocolError),
    ("0x chunk size", [CHUNKED_HEAD + b"0x5\r\nhello\r\n0\r\n\r\n"], httpx.RemoteProtocolError),
    ("underscore chunk size", [CHUNKED_HEAD + b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n"], httpx.RemoteProtocolError),
    ("plus chunk size", [CHUNKED_HEAD + b"+5\r\nhello\r\n0\r\n\r\n"], httpx.RemoteProtocolError),
    ("empty chunk size", [CHUNKED_HEAD + b"\r\nhello\r\n0\r\n\r\n"], httpx.RemoteProtocolError),
    ("missing final CRLF", [CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n"], httpx.RemoteProtocolError),
    ("no last chunk", [CHUNKED_HEAD + b"5\r\nhello\r\n"], httpx.RemoteProtocolError),
    ("closed mid-chunk", [CHUNKED_HEAD + b"a\r\nhello"], httpx.RemoteProtocolError),
    ("closed mid size line", [CHUNKED_HEAD + b"5\r\nhello\r\n1"], httpx.RemoteProtocolError),
    ("chunk data too long", [CHUNKED_HEAD + b"3\r\nhello\r\n0\r\n\r\n"], httpx.RemoteProtocolError),
    (
        "chunked and a length",
        [OK + b"Transfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
        b"ok",
    ),
    ("chunked in two headers", [OK + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n"], None),
    ("gzip transfer coding", [OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"], None),
    ("not quite chunked", [OK + b"Transfer-Encoding: xchunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"], None),
    ("identity transfer coding", [OK + b"Transfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nok"], None),
    # Content-Length bodies
    ("exact length", [OK + b"Content-Length: 5\r\n\r\nhello"], b"hello"),
    ("short length", [OK + b"Content-Length: 10\r\n\r\nhello"], httpx.RemoteProtocolError),
    ("zero length", [OK + b"Content-Length: 0\r\n\r\n"], b""),
    ("same length twice", [OK + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"], b"hello"),
    ("same length in a list", [OK + b"Content-Length: 5, 5\r\n\r\nhello"], b"hello"),
    ("conflicting lengths", [OK + b"Content-Length: 5\r\nContent-Length: 3\r\n\r\nhello"], httpx.RemoteProtocolError),
    ("negative length", [OK + b"Content-Length: -1\r\n\r\nhello"], httpx.RemoteProtocolError),
    ("until close", [OK + b"Content-Type: text/plain\r\n\r\nhel", b"lo"], b"hello"),
    ("HTTP/1.0 until close", [b"HTTP/1.0 200 OK\r\n\r\nhello"], b"hello"),
    ("HTTP/1.0 with length", [b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"], b"hello"),
    # heads
    ("no reason phrase", [b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok"], b"ok"),
    ("empty reason phrase", [b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok"], b"ok"),
    ("no space after colon", [OK + b"Content-Length:2\r\nX-A:\t b \t\r\n\r\nok"], b"ok"),
    ("duplicate headers", [OK + b"X-A: 1\r\nX-A: 2\r\nContent-Length: 2\r\n\r\nok"], b"ok"),
    ("folded header", [OK + b"X-A: 1\r\n  continued\r\nContent-Length: 2\r\n\r\nok"], b"ok"),
    ("space before colon", [OK + b"Content-Length : 2\r\n\r\nok"], httpx.RemoteProtocolError),
    ("100 Continue first", [b"HTTP/1.1 100 Continue\r\n\r\n", OK + b"Content-Length: 2\r\n\r\nok"], b"ok"),
    (
        "101 then an answer",
        [b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\n" + OK + b"Content-Length: 2\r\n\r\nok"],
        None,
    ),
    ("204 with no body", [b"HTTP/1.1 204 No Content\r\n\r\n"], b""),
    ("304 with no body", [b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"], b""),
    ("two-digit status", [b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok"], httpx.RemoteProtocolError),
    ("head split at every byte", [bytes([byte]) for byte in OK + b"Content-Length: 2\r\n\r\nok"], b"ok"),
    ("bare LF line ends", [b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"], None),
    ("head never ends", [OK + b"X-A: 1\r\n"], httpx.RemoteProtocolError),
]


@pytest.mark.parametrize(("pieces", "expected"), [case[1:] for case in SAME], ids=[case[0] for case in SAME])
async def test_the_lean_transport_ends_an_answer_as_httpx_does(pieces: list[bytes], expected: Outcome | None) -> None:
    lean, reference = await both(pieces)
    assert lean == reference
    if expected is not None:
        assert lean == expected


async def test_a_chunked_body_split_at_every_byte_arrives_whole() -> None:
    body = chunked(b'data: {"a": 1}\n\n', b"data: [DONE]\n\n")
    answer = CHUNKED_HEAD + b"5;x=y\r\nhello\r\n" + body.replace(b"0\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n")
    pieces = [answer[:20]] + [bytes([byte]) for byte in answer[20:]]
    lean, reference = await both(pieces)
    assert lean == reference == b'hellodata: {"a": 1}\n\ndata: [DONE]\n\n'


async def test_many_interim_answers_are_an_httpx_error_or_skipped_never_a_crash() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" * 3000
    lean = await outcome(LeanTransport, [interim + OK + b"Content-Length: 2\r\n\r\nok"])
    assert lean in (b"ok", httpx.RemoteProtocolError)


async def test_a_head_over_the_limit_is_refused_without_reading_it_all() -> None:
    sent = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(OK)
        line = b"X-Padding: " + b"a" * 1000 + b"\r\n"
        while sent < 100 * MAX_HEAD_BYTES:  # an endless head: the client must stop reading it
            writer.write(line)
            sent += len(line)
            await writer.drain()
        writer.close()

    async with lean_client(handler) as (client, url):
        with pytest.raises(httpx.RemoteProtocolError, match="too long"):
            await post(client, url)
    assert sent < 100 * MAX_HEAD_BYTES


async def test_extra_bytes_after_a_body_never_become_the_next_answer() -> None:
    async def handler(_connection: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            # Two bytes past the declared length: a broken server, whose connection cannot be trusted again.
            writer.write(OK + b"Content-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad")
            await writer.drain()

    server = Connections(handler)
    async with lean_client(server) as (client, url):
        bodies = [(await post(client, url)).content for _ in range(3)]
    assert bodies == [b"ok", b"ok", b"ok"]
    assert server.count == 3


@pytest.mark.parametrize("close", [b"Connection: close\r\n", b""], ids=["connection-close", "http-1.0"])
async def test_a_connection_the_server_closes_is_never_reused(close: bytes) -> None:
    async def handler(_connection: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        status = OK if close else b"HTTP/1.0 200 OK\r\n"
        writer.write(status + close + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)  # the client has its answer before the close arrives
        writer.close()

    server = Connections(handler)
    async with lean_client(server) as (client, url):
        bodies = [(await post(client, url)).content for _ in range(3)]
    assert bodies == [b"ok", b"ok", b"ok"]
    assert server.count == 3


async def test_headers_then_silence_is_a_read_timeout_and_the_next_request_gets_a_fresh_connection() -> None:
    async def handler(connection: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if connection == 1:
            writer.write(OK + b"Content-Length: 10\r\n\r\nhel")
            await writer.drain()
            await asyncio.sleep(SILENT_S)
        writer.write(OK + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()

    server = Connections(handler)
    async with lean_client(server, timeout=READ_TIMEOUT_S) as (client, url):
        with pytest.raises(httpx.ReadTimeout):
            await post(client, url)
        again = await post(client, url)
    assert again.content == b"ok"
    assert server.count == 2


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(OK + b"Content-Length: 2\r\n\r\nok")
    await writer.drain()
    await reader.read()


async def test_a_server_that_never_accepts_is_a_connect_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue: later connections wait for a SYN answer that never comes
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(address)
            fillers.append(filler)
        # The cancelled connect below is cut at 0.1 s, long before this timeout could fire; the
        # working server's connect completes at once, however loaded the machine.
        timeout = httpx.Timeout(5, connect=READ_TIMEOUT_S)
        silent = f"http://{address[0]}:{address[1]}/"
        async with lean_client(answer_ok, timeout) as (client, url):
            with pytest.raises(httpx.ConnectTimeout):
                await asyncio.wait_for(client.get(silent), LIMIT_S)
            with pytest.raises(TimeoutError):  # cancelled while connecting
                await asyncio.wait_for(client.get(silent), 0.1)
            # The same transport still works once a server answers.
            assert (await post(client, url)).content == b"ok"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.parametrize("where", ["head", "body"])
async def test_a_request_cancelled_mid_read_leaves_no_half_read_connection(where: str) -> None:
    async def handler(connection: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if connection == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Le" if where == "head" else CHUNKED_HEAD + b"5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.3)  # the request is cancelled meanwhile; then the rest of its answer comes
            writer.write(b"ngth: 3\r\n\r\nold" if where == "head" else b"3\r\nold\r\n0\r\n\r\n")
            await writer.drain()
            await read_request(reader)  # a client reusing this connection reads "old" as its answer
        writer.write(OK + b"Content-Length: 3\r\n\r\nnew")
        await writer.drain()
        await reader.read()

    server = Connections(handler)
    async with lean_client(server) as (client, url):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(_body(client, url), 0.1)
        await asyncio.sleep(0.4)  # the rest of the first answer has arrived
        again = await asyncio.wait_for(_body(client, url), LIMIT_S)
    assert again == b"new"
    assert server.count == 2


async def test_a_gzip_stream_through_the_backend_reads_as_text() -> None:
    heads: list[bytes] = []
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "The answer "}}]},
        {"choices": [{"index": 0, "delta": {"content": "is 5."}, "finish_reason": "stop"}]},
    ]
    body = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events) + b"data: [DONE]\n\n"
    packed = gzip.compress(body)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        heads.append(head)
        writer.write(
            OK + b"Content-Type: text/event-stream\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for start in range(0, len(packed), 7):  # gzip members split at arbitrary bytes across chunks
            writer.write(chunked(packed[start : start + 7])[: -len(b"0\r\n\r\n")])
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with serving(handler) as url:
        backend = OpenAIBackend(url + "/v1", model="m", timeout=2)
        assert backend._lean
        try:
            (completion,) = await asyncio.wait_for(backend.generate(MESSAGES, 1, PARAMS), LIMIT_S)
        finally:
            await backend.aclose()
    assert completion.text == "The answer is 5."
    assert b"accept-encoding: gzip" in heads[0].lower()


async def test_a_stream_chunk_with_a_finish_reason_that_is_not_a_string_is_a_protocol_error() -> None:
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "The answer "}}]},
        {"choices": [{"index": 0, "delta": {"content": "is 5."}, "finish_reason": {"why": "stop"}}]},
    ]
    body = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events) + b"data: [DONE]\n\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK + b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(body))
        await writer.drain()
        await reader.read()

    async with serving(handler) as url:
        backend = OpenAIBackend(url + "/v1", model="m", timeout=2)
        try:
            completion = await asyncio.wait_for(backend.stream(MESSAGES, PARAMS, lambda c, r: None), LIMIT_S)
        finally:
            await backend.aclose()
    # What streamed before the bad chunk is kept; the call failed as a protocol error, not a crash.
    assert (completion.text, completion.error_kind) == ("The answer is 5.", "protocol")
    assert completion.error is not None and "malformed stream chunk (finish_reason is a dict" in completion.error


async def test_many_concurrent_streams_through_the_backend_survive_faulty_connections() -> None:
    """A pool of lean connections against a server that cuts, stalls or garbles some answers: retried, never mixed."""
    answered = 0

    def stream_for(text: str) -> bytes:
        event = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}]}
        return chunked(b"data: " + json.dumps(event).encode() + b"\n\n", b"data: [DONE]\n\n")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        while True:
            head, body = await read_request(reader)
            answered += 1
            text = json.loads(body)["messages"][0]["content"]
            fault = answered % 5
            if fault == 1:  # cut mid-chunk
                writer.write(CHUNKED_HEAD + b"40\r\ndata: {")
                await writer.drain()
                writer.close()
                return
            if fault == 2:  # garbage chunk size
                writer.write(CHUNKED_HEAD + b"zz\r\n")
                await writer.drain()
                writer.close()
                return
            if fault == 3:  # stall past the read timeout
                writer.write(CHUNKED_HEAD)
                await writer.drain()
                await asyncio.sleep(SILENT_S)
                return
            answer = stream_for(text)
            writer.write(CHUNKED_HEAD)
            for start in range(0, len(answer), 11):
                writer.write(answer[start : start + 11])
                await writer.drain()

    retry = RetryPolicy(max_attempts=8, backoff_base=0.001, backoff_max=0.01)
    async with serving(handler) as url:
        backend = OpenAIBackend(url + "/v1", model="m", timeout=READ_TIMEOUT_S, retry=retry, max_connections=8)
        assert backend._lean
        try:
            calls = [backend.generate([{"role": "user", "content": f"question {i}"}], 1, PARAMS) for i in range(40)]
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)
        finally:
            await backend.aclose()
    texts = [result[0].text if isinstance(result, list) else result for result in results]
    for i, text in enumerate(texts):
        assert text == f"question {i}" or isinstance(text, BackendError), text
    assert sum(text == f"question {i}" for i, text in enumerate(texts)) >= 30


async def test_a_slow_reader_holds_back_a_fast_server_instead_of_buffering_the_body() -> None:
    size, piece = 32 * 1024 * 1024, b"x" * (1024 * 1024)
    sent = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(OK + b"Content-Length: %d\r\n\r\n" % size)
        while sent < size:
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
        await reader.read()

    largest = 0
    async with (
        lean_client(handler, timeout=5) as (client, url),
        client.stream("POST", url + "/", content=b"x") as response,
    ):
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
            largest = max(largest, len(chunk))
            await asyncio.sleep(0.05)  # a slow consumer (a relay to a slow client)
    assert received == size
    # Each piece is what the client held in memory at once: the rest waited in socket buffers.
    assert largest <= 4 * 1024 * 1024


@pytest.mark.http
async def test_many_streams_through_the_pool_against_fastbackend_faults_match_httpx() -> None:
    """Forty-eight concurrent streamed calls over the lean pool, a fifth of them cut, reset or garbled: retried to
    the same texts httpx's own transport reads from the same server without faults."""
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(48)]
    params = [GenerationParams(max_tokens=64, seed=i) for i in range(48)]
    retry = RetryPolicy(max_attempts=12, backoff_base=0.001, backoff_max=0.01, budget_min=100)

    async def texts(url: str, transport: httpx.AsyncBaseTransport | None) -> list[str]:
        # No fault hangs: the timeout only ever fires on a stall of the machine's, which 10 s outlasts.
        backend = OpenAIBackend(url, model="fast", n_mode="off", timeout=10, retry=retry, transport=transport)
        assert backend._lean == (transport is None)
        async with backend:
            calls = [backend.generate(prompt, 1, param) for prompt, param in zip(prompts, params, strict=True)]
            results = await asyncio.wait_for(asyncio.gather(*calls), 60)
        return [completion.text for (completion,) in results]

    faults = "reset_mid:0.06,truncated:0.04,malformed:0.04,reset:0.03,down:0.03"
    with fast_backend("--faults", faults, "--fault-seed", 3, "--completion-tokens", 40) as server:
        lean = await texts(server.url, None)
        injected = server.stats()[0]["faults"]
    with fast_backend("--completion-tokens", 40) as server:
        reference = await texts(server.url, httpx.AsyncHTTPTransport())
    assert sum(injected.values()) >= 5
    assert lean == reference and all(reference)


async def test_a_connection_paused_for_a_slow_reader_still_notices_the_server_closing_it() -> None:
    body = b"y" * (1024 * 1024 + 100 * 1024)  # crosses the pause threshold in its last received piece
    released, dropped = asyncio.Event(), asyncio.Event()

    async def handler(connection: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        if connection == 1:
            await released.wait()
            writer.close()  # an idle keep-alive connection the server drops
            await writer.wait_closed()
            dropped.set()

    server = Connections(handler)
    async with lean_client(server) as (client, url):
        async with client.stream("POST", url + "/", content=b"x") as response:
            await asyncio.sleep(0.2)  # the whole body arrives before it is read
            assert await response.aread() == body
        released.set()  # back in the pool, idle
        # Waited for, not slept on: the socket is closed, so the client's next look at it finds the FIN.
        await asyncio.wait_for(dropped.wait(), LIMIT_S)
        again = await post(client, url)
    assert again.content == body
    assert server.count == 2


@pytest.mark.parametrize(
    "sent",
    [b"", OK + b"Content-Length: 10\r\n\r\nhel", CHUNKED_HEAD + b"a\r\nhel"],
    ids=["before-the-head", "mid-length-body", "mid-chunk"],
)
async def test_a_connection_reset_is_an_httpx_error_as_with_httpx(sent: bytes) -> None:
    async def outcome_with_reset(make: Callable[[], httpx.AsyncBaseTransport]) -> Outcome:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(sent)
            await writer.drain()
            await asyncio.sleep(0.05)
            # SO_LINGER 0: close() sends a TCP RST instead of a FIN.
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

        return await outcome_of(handler, make)

    lean, reference = await outcome_with_reset(LeanTransport), await outcome_with_reset(httpx.AsyncHTTPTransport)
    assert lean == reference, (lean, reference)
    assert isinstance(lean, type) and issubclass(lean, httpx.TransportError)


async def test_a_gzip_json_answer_through_the_backend_reads_as_text() -> None:
    """A server (or proxy) that ignores ``stream`` and compresses its one JSON completion."""
    answer = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "It is 5."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 4},
    }
    packed = gzip.compress(json.dumps(answer).encode())

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            OK + b"Content-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(packed)
        )
        writer.write(packed)
        await writer.drain()
        await reader.read()

    async with serving(handler) as url:
        backend = OpenAIBackend(url + "/v1", model="m", timeout=2)
        async with backend:
            (completion,) = await asyncio.wait_for(backend.generate(MESSAGES, 1, PARAMS), LIMIT_S)
    assert completion.text == "It is 5."


class CountingBuffer(bytearray):
    """A receive buffer that counts the bytes its ``find`` calls search."""

    searched = 0

    def find(self, sub: bytes, start: int | None = 0, end: int | None = None, /) -> int:  # type: ignore[override]
        start = start or 0
        CountingBuffer.searched += max(0, (len(self) if end is None else min(end, len(self))) - start)
        return super().find(sub, start, end)


@pytest.mark.parametrize("part", ["head", "chunk size line", "trailers"])
async def test_a_head_or_chunk_line_sent_byte_by_byte_is_searched_in_linear_time(
    part: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http11, "bytearray", CountingBuffer, raising=False)
    CountingBuffer.searched = 0
    padding = b"a" * 20_000
    slow = {
        "head": b"X-Padding: " + padding + b"\r\nContent-Length: 2\r\n\r\n",
        "chunk size line": b"2;ext=" + padding + b"\r\nok\r\n0\r\n\r\n",
        "trailers": b"0\r\nX-Padding: " + padding + b"\r\n\r\n",
    }[part]
    first = OK if part == "head" else CHUNKED_HEAD + (b"" if part == "chunk size line" else b"2\r\nok\r\n")
    last = b"ok" if part == "head" else b""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(first)
        for byte in slow:
            writer.write(bytes([byte]))
            await asyncio.sleep(0)  # the client reads between the bytes
        writer.write(last)
        await writer.drain()
        await reader.read()

    async with lean_client(handler, timeout=5) as (client, url):
        answer = await post(client, url)
    assert answer.content == b"ok"
    assert CountingBuffer.searched < 10 * len(slow)  # searching it all again at each byte: about 1000 times more
