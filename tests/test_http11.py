"""The lean HTTP/1.1 transport (pacore.backends.http11) against raw loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from pacore.backends.http11 import LeanTransport
from pacore.backends.openai_http import OpenAIBackend

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A loopback server whose every connection ``handler`` answers byte by byte; yields its base URL."""
    connections: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await handler(reader, writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in connections:
            writer.close()
        server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_a_chunked_body_arrives_whole_and_in_fewer_pieces_than_chunks() -> None:
    events = [b'data: {"n": %d}\n\n' % i for i in range(50)]
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await read_request(reader)
        heads.append(head + body)
        writer.write(CHUNKED_HEAD + chunked(*events))  # all at once: the client finds them buffered together
        await writer.drain()
        await reader.read()

    async with (
        raw_server(handler) as url,
        httpx.AsyncClient(transport=LeanTransport()) as client,
        client.stream("POST", url + "/v1/x", content=b'{"a":1}') as response,
    ):
        pieces = [piece async for piece in response.aiter_raw()]
    assert b"".join(pieces) == b"".join(events)
    assert len(pieces) < len(events)
    assert heads[0].startswith(b"POST /v1/x HTTP/1.1\r\n") and heads[0].endswith(b'\r\n\r\n{"a":1}')


async def test_the_connection_is_kept_alive_between_requests_and_renewed_when_closed() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for answer in range(2):
            await read_request(reader)
            close = b"Connection: close\r\n" if answer == 1 else b""
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + close + b"\r\nok")
            await writer.drain()
        writer.close()

    async with raw_server(handler) as url, httpx.AsyncClient(transport=LeanTransport()) as client:
        bodies = [(await client.post(url + "/", content=b"x")).content for _ in range(3)]
    assert bodies == [b"ok", b"ok", b"ok"]
    assert connections == 2  # the second answer said Connection: close


async def test_a_server_silent_past_the_read_timeout_is_a_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_HEAD + b"5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(3600)  # silent until the test ends

    received = []
    # 2 s: the head and the first chunk arrive within it even on a loaded machine, then nothing does.
    async with (
        raw_server(handler) as url,
        httpx.AsyncClient(transport=LeanTransport(), timeout=2) as client,
        client.stream("POST", url + "/", content=b"x") as response,
    ):

        async def read_all() -> None:
            async for piece in response.aiter_raw():
                received.append(piece)

        with pytest.raises(httpx.ReadTimeout):
            await asyncio.wait_for(read_all(), 60)  # a read timeout that never fires fails here, not hangs
    assert received == [b"hello"]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (CHUNKED_HEAD + b"5\r\nhel", httpx.RemoteProtocolError),  # cut inside a chunk
        (CHUNKED_HEAD + b"zz\r\nhello\r\n", httpx.RemoteProtocolError),  # not a chunk size
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", httpx.RemoteProtocolError),
        (b"", httpx.RemoteProtocolError),  # closed without an answer
        (b"SMTP ready\r\n\r\n", httpx.RemoteProtocolError),
    ],
)
async def test_broken_answers_raise_httpx_errors(answer: bytes, error: type[Exception]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with raw_server(handler) as url, httpx.AsyncClient(transport=LeanTransport(), timeout=2) as client:
        with pytest.raises(error):
            await client.post(url + "/", content=b"x")


async def test_nobody_listening_is_a_connect_error() -> None:
    async with raw_server(lambda reader, writer: asyncio.sleep(0)) as url:
        pass  # closed: its port now refuses connections
    async with httpx.AsyncClient(transport=LeanTransport()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(url + "/")


def test_the_openai_backend_uses_it_for_plain_http_without_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    assert OpenAIBackend("http://127.0.0.1:8000/v1", model="m")._lean
    assert not OpenAIBackend("https://api.example.com/v1", model="m")._lean
    monkeypatch.setenv("NO_PROXY", "localhost")
    assert OpenAIBackend("http://127.0.0.1:8000/v1", model="m")._lean  # names no proxy by itself
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    assert not OpenAIBackend("http://127.0.0.1:8000/v1", model="m")._lean  # httpx honours the proxy


async def test_the_backend_sends_through_it_byte_for_byte_what_httpx_s_own_transport_sends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await read_request(reader)
        requests.append(head + body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()

    async with raw_server(handler) as url:
        for transport in ("lean", "httpx"):
            monkeypatch.setenv("PACORE_HTTP_TRANSPORT", transport)
            async with OpenAIBackend(url + "/v1", model="m", api_key="sk-test", timeout=2) as backend:
                assert backend._lean == (transport == "lean")
                async with backend._http().stream("POST", backend._chat_url, content=b'{"a":1}') as response:
                    await response.aread()
    lean, through_httpx = requests
    assert lean == through_httpx
    assert b"\r\nUser-Agent: python-httpx/" in lean and b"\r\nAuthorization: Bearer sk-test\r\n" in lean


async def test_a_lean_connection_pool_leaves_no_httpx_client_open(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[httpx.Client | httpx.AsyncClient] = []

    class RecordedClient(httpx.Client):
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            made.append(self)

    class RecordedAsyncClient(httpx.AsyncClient):
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            made.append(self)

    monkeypatch.setattr(httpx, "Client", RecordedClient)
    monkeypatch.setattr(httpx, "AsyncClient", RecordedAsyncClient)
    monkeypatch.delenv("PACORE_HTTP_TRANSPORT", raising=False)
    backend = OpenAIBackend("http://127.0.0.1:8000/v1", model="m")
    assert backend._lean
    backend._http()  # the pool, with the headers and timeouts its requests carry
    assert [client for client in made if not client.is_closed] == []
    await backend.aclose()
