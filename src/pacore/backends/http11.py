"""A lean HTTP/1.1 transport for ``httpx``: one keep-alive ``http://`` connection, streamed bodies read in bulk.

Why: every backend call streams one server-sent event per token, and a
server sends each event as its own HTTP chunk. Through httpcore and h11 each
chunk is one event object passed up five async generators, about as much
CPU as the rest of the call (``bench/proxy.py``; ``docs/latency.md``). Here
a chunked body is decoded on bytes and everything that has arrived is handed
over as one piece, and a request goes out in one write (headers and body),
so the server wakes once to read it.

Scope: plain ``http://`` without a proxy (a local vLLM, SGLang or llama.cpp
server); :class:`~pacore.backends.openai_http.OpenAIBackend` uses httpx's
own transport for anything else. One transport holds one connection, as the
backend's pool gives each connection its own client. Failures raise httpx's
own exceptions (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``,
``ReadError``, ``WriteError``, ``RemoteProtocolError``), so callers handle
them as before; timeouts come from the request's ``timeout`` extension, the
read timeout applying to each wait for data (an inactivity limit).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx

#: Longest status line plus headers accepted from a server.
MAX_HEAD_BYTES = 64 * 1024
_CHUNKED, _LENGTH, _UNTIL_CLOSE, _EMPTY = range(4)
_HEX_DIGITS = b"0123456789abcdefABCDEF"
#: Received bytes held before the socket stops being read, until the reader asks for more.
_HIGH_WATER_BYTES = 1024 * 1024


class _Connection(asyncio.Protocol):
    """The bytes one connection has received, and a way to wait for more."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER_BYTES and not self.paused and self.transport is not None:
            # A reader slower than the server (a relay to a slow client) would otherwise hold the
            # whole body in memory: leave the rest in the socket buffers, so TCP holds the server back.
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def more(self, timeout: float | None) -> bool:
        """Wait until more bytes arrive (``True``) or the connection ends (``False``); ``ReadTimeout`` after ``timeout`` s."""
        if self.closed:
            return False
        self.resume()
        waiter = self.waiter = self.loop.create_future()
        timer = None if timeout is None else self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()
        return not self.closed or bool(self.buffer)

    def resume(self) -> None:
        """Read the socket again after ``data_received`` paused it."""
        if self.paused:
            self.paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout("timed out waiting for the server"))


class LeanTransport(httpx.AsyncBaseTransport):
    """One keep-alive HTTP/1.1 connection for ``http://`` requests (see the module docstring)."""

    def __init__(self) -> None:
        self._connection: _Connection | None = None
        self._origin: tuple[str, int] | None = None
        self._busy = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._busy:
            raise RuntimeError("LeanTransport serves one request at a time")
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        url = request.url
        origin = (url.host, url.port or 80)
        connection = self._connection
        if connection is None or connection.closed or connection.buffer or origin != self._origin:
            if connection is not None:
                connection.close()
            connection = self._connection = await self._connect(origin, timeouts.get("connect"))
            self._origin = origin
        body = await request.aread()
        head = [f"{request.method} {url.raw_path.decode('ascii')} HTTP/1.1\r\n".encode("ascii")]
        head += [name + b": " + value + b"\r\n" for name, value in request.headers.raw]
        try:
            assert connection.transport is not None
            connection.transport.write(b"".join(head) + b"\r\n" + body)  # one write: the server wakes once
        except (OSError, RuntimeError) as exc:
            self._drop()
            raise httpx.WriteError(str(exc) or type(exc).__name__) from exc
        self._busy = True
        try:
            version, status, headers, framing, length = await self._read_head(connection, timeouts.get("read"), request)
        except BaseException:
            self._busy = False
            self._drop()
            raise
        stream = _Body(self, connection, framing, length, timeouts.get("read"), _keeps_alive(version, headers))
        return httpx.Response(status, headers=headers, stream=stream, extensions={"http_version": b"HTTP/1.1"})

    async def _connect(self, origin: tuple[str, int], timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        connecting = loop.create_task(loop.create_connection(lambda: _Connection(loop), *origin))
        try:
            # Not asyncio.timeout: a connection made while the loop was busy elsewhere past the
            # timeout would be cut as it completes; only one still pending at the timeout failed.
            await asyncio.wait((connecting,), timeout=timeout)
        except BaseException:
            connecting.cancel()
            if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
                connecting.result()[0].close()  # made, but the caller was cancelled meanwhile
            raise
        if not connecting.done():
            connecting.cancel()
            raise httpx.ConnectTimeout("timed out connecting to the server")
        try:
            _, connection = connecting.result()
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return connection

    async def _read_head(
        self, connection: _Connection, timeout: float | None, request: httpx.Request
    ) -> tuple[bytes, int, list[tuple[bytes, bytes]], int, int]:
        interim = 0
        while True:
            head = await _next_head(connection, timeout)
            version, status, headers = _parse_head(head)
            if not 100 <= status < 200:
                break
            if status == 101:  # what follows is no longer HTTP (httpx refuses it too)
                raise httpx.RemoteProtocolError("the server switched protocols (101)")
            # An interim answer: the real one follows. A loop, not a recursion (thousands of them
            # overflowed the stack), and bounded like one head, so a server cannot send them for ever.
            interim += len(head)
            if interim > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("the server sent too many interim (1xx) answers")
        if request.method == "HEAD" or status in (204, 304):
            return version, status, headers, _EMPTY, 0
        encodings = [
            coding.strip().lower()
            for name, value in headers
            if name.lower() == b"transfer-encoding"
            for coding in value.split(b",")
        ]
        if encodings == [b"chunked"]:
            return version, status, headers, _CHUNKED, 0
        if encodings:
            # A "gzip, chunked" body would be handed over still compressed, as if it were text; httpx
            # refuses every transfer coding but chunked too.
            raise httpx.RemoteProtocolError(f"unsupported Transfer-Encoding {b', '.join(encodings)[:40]!r}")
        # Every Content-Length value, repeated headers and comma lists alike: proxies repeat one
        # value (accepted, as httpx does); differing ones leave the body's end unknown, and taking
        # either could return a truncated body as a whole one.
        declared = {
            value.strip()
            for name, values in headers
            if name.lower() == b"content-length"
            for value in values.split(b",")
        }
        if not declared:
            return version, status, headers, _UNTIL_CLOSE, 0
        length = declared.pop()
        if declared or not length.isdigit():
            raise httpx.RemoteProtocolError("malformed or conflicting Content-Length headers")
        return version, status, headers, _LENGTH, int(length)

    def _release(self, reusable: bool) -> None:
        self._busy = False
        if not reusable:
            self._drop()
        elif self._connection is not None:
            self._connection.resume()  # a paused idle connection would not notice the server closing it

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def aclose(self) -> None:
        self._drop()


async def _next_head(connection: _Connection, timeout: float | None) -> bytes:
    """The next status line and headers, without the blank line that ends them."""
    buffer = connection.buffer
    start = 0  # bytes searched before cannot hold the end: a head sent byte by byte costs linear time
    while True:
        end = buffer.find(b"\r\n\r\n", start)
        # Lines may also end in a bare LF (httpx accepts it): the head ends at the first empty line.
        bare = buffer.find(b"\n\n", start, None if end < 0 else end)
        if bare >= 0:
            head = bytes(buffer[:bare]).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            del buffer[: bare + 2]
            return head
        if end >= 0:
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            return head
        if len(buffer) > MAX_HEAD_BYTES:
            raise httpx.RemoteProtocolError("the server sent response headers that are too long")
        start = max(0, len(buffer) - 3)
        if not await connection.more(timeout):
            _raise_closed(connection, "Server disconnected without sending a response.")


def _parse_head(head: bytes) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
    """The HTTP version, status code and header fields of a response head."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"malformed status line {lines[0][:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t") and headers:
            # An obsolete folded line continues the previous value (RFC 9112 5.2); httpx accepts it too.
            name, value = headers[-1]
            headers[-1] = (name, (value + b" " + line.strip()).strip())
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return parts[0], int(parts[1]), headers


def _keeps_alive(version: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    """HTTP/1.1 keeps the connection unless told to close it; HTTP/1.0 only when told to keep it."""
    said = b" ".join(value.lower() for name, value in headers if name.lower() == b"connection")
    return b"keep-alive" in said if version == b"HTTP/1.0" else b"close" not in said


def _raise_closed(connection: _Connection, message: str) -> None:
    if connection.error is not None:
        raise httpx.ReadError(str(connection.error) or type(connection.error).__name__) from connection.error
    raise httpx.RemoteProtocolError(message)


class _Body(httpx.AsyncByteStream):
    """A response body; a chunked one yields all the data that has arrived at each step, not one piece per chunk."""

    def __init__(
        self,
        transport: LeanTransport,
        connection: _Connection,
        framing: int,
        length: int,
        timeout: float | None,
        keep_alive: bool,
    ) -> None:
        self.transport = transport
        self.connection = connection
        self.framing = framing
        self.length = length
        self.timeout = timeout
        self.keep_alive = keep_alive
        self.complete = framing == _EMPTY
        self.released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.framing == _CHUNKED:
            reader = self._chunked()
        elif self.framing == _LENGTH:
            reader = self._sized()
        elif self.framing == _UNTIL_CLOSE:
            reader = self._until_close()
        else:
            return
        async for piece in reader:
            yield piece
        self._finish()

    async def _sized(self) -> AsyncIterator[bytes]:
        connection, left = self.connection, self.length
        while left:
            if not connection.buffer and not await connection.more(self.timeout):
                _raise_closed(connection, "peer closed connection without sending complete message body")
            piece = bytes(connection.buffer[:left])
            del connection.buffer[: len(piece)]
            left -= len(piece)
            if piece:
                yield piece
        self.complete = True

    async def _until_close(self) -> AsyncIterator[bytes]:
        connection = self.connection
        self.keep_alive = False
        while True:
            if connection.buffer:
                piece = bytes(connection.buffer)
                connection.buffer.clear()
                yield piece
            if not await connection.more(self.timeout):
                if connection.error is not None:
                    _raise_closed(connection, "")
                break
        self.complete = True

    async def _chunked(self) -> AsyncIterator[bytes]:
        connection = self.connection
        buffer = connection.buffer
        left = 0  # bytes of the current chunk still to come; -1 while its closing CRLF is
        scanned = 0  # of a size line still incomplete: a line sent byte by byte costs linear time
        while True:
            pieces = []
            while True:
                if left > 0:
                    piece = bytes(buffer[:left])
                    if not piece:
                        break
                    del buffer[: len(piece)]
                    pieces.append(piece)
                    left -= len(piece)
                    if left:
                        break
                    left = -1
                if left < 0:
                    if len(buffer) < 2:
                        break
                    if buffer[:2] != b"\r\n":
                        raise httpx.RemoteProtocolError("malformed chunked body: no CRLF after a chunk")
                    del buffer[:2]
                    left = 0
                end = buffer.find(b"\r\n", scanned)
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise httpx.RemoteProtocolError("malformed chunked body: chunk size line too long")
                    scanned = max(0, len(buffer) - 1)
                    break
                scanned = 0
                size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
                # Hex digits only: int() alone also takes "0x5", "+5" and "1_0", which httpx refuses.
                if not size_text or size_text.strip(_HEX_DIGITS):
                    raise httpx.RemoteProtocolError(f"malformed chunk size {size_text[:20]!r}")
                size = int(size_text, 16)
                if size == 0:
                    if pieces:
                        yield b"".join(pieces)
                    await self._trailers()
                    self.complete = True
                    return
                del buffer[: end + 2]
                left = size
            if pieces:
                yield b"".join(pieces)
            if not await connection.more(self.timeout):
                _raise_closed(
                    connection, "peer closed connection without sending complete message body: incomplete chunked read"
                )

    async def _trailers(self) -> None:
        """Skip the last chunk's size line and any trailer fields, up to the blank line that ends the body."""
        buffer = self.connection.buffer
        start = 0  # as in _next_head: never search the same bytes twice
        while True:
            # "0\r\n\r\n", or "0\r\n" then trailer lines then "\r\n": either way, up to the first blank line.
            end = buffer.find(b"\r\n\r\n", start)
            if end >= 0:
                del buffer[: end + 4]
                return
            if len(buffer) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("malformed chunked body: trailers too long")
            start = max(0, len(buffer) - 3)
            if not await self.connection.more(self.timeout):
                _raise_closed(self.connection, "peer closed connection without sending complete message body")

    def _finish(self) -> None:
        if not self.released:
            self.released = True
            self.transport._release(self.complete and self.keep_alive and not self.connection.buffer)

    async def aclose(self) -> None:
        if not self.released:
            self.released = True
            # Not read to its end: what is left of it would be read as the next answer.
            self.transport._release(self.complete and self.keep_alive and not self.connection.buffer)
