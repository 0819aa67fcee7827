"""HTTP connections that cannot hold the server: uvicorn's HTTP/1.1 protocols with read and write limits.

uvicorn closes idle keep-alive connections, but a client that sends its
headers a byte at a time, or stops reading a response, keeps its connection
(and, for a stream, its request slot) for as long as it likes. The protocols
here add, per connection:

- a header timeout: a request's headers must be complete within
  ``header_timeout`` seconds of the connection opening (or of the previous
  response ending); a client that sent part of them gets a 408;
- a header size limit: a request line and headers of more than
  :data:`MAX_HEAD_BYTES` get a 431 (h11 refused them with a 400 already;
  httptools has no limit of its own);
- a write-stall timeout: while the connection's write buffer is full (the
  client is not reading), the client must take some of it every
  ``write_timeout`` seconds, or the connection is dropped. What is pending
  counts the kernel's send queue too (Linux): a steady slow reader drains
  that queue long before the socket has room for the process's buffer again;
- malformed HTTP gets its 400 in OpenAI's JSON error shape, not plain text.

They also send a response's status line and headers in one write with its
body (see :class:`_CoalescingTransport`): the client wakes once per response.

:func:`guarded_protocol` picks uvicorn's httptools protocol (a C parser) when
httptools is installed (the ``server`` extra installs it) and its h11
protocol otherwise. The body's own timeout is the app's (see
``pacore.server.app``), so that a slow body gets a 408 in OpenAI's shape from
the route that was reading it.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import struct
import termios
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal

from uvicorn.protocols.http.h11_impl import H11Protocol

from pacore.server.errors import HeadersTooLargeError, InvalidRequestError, RequestTimeoutError, describe

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: h11 serves
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

logger = logging.getLogger("pacore.server")

CutReason = Literal["header_timeout", "headers_too_large", "write_stall"]

#: The most a request line and its headers may take (h11's own default limit).
MAX_HEAD_BYTES = 16 * 1024
#: h11's own limit, set above ours (``uvicorn.Config(h11_max_incomplete_event_size=...)``) so that
#: an oversized head gets the same 431 whichever parser reads it.
H11_HEAD_LIMIT = 4 * MAX_HEAD_BYTES

#: The ioctl that reads how many bytes a socket's kernel send queue holds (Linux's SIOCOUTQ).
_SEND_QUEUE = getattr(termios, "TIOCOUTQ", None)


def _kernel_send_queue(transport: asyncio.BaseTransport) -> int:
    """Bytes written to the socket that its peer has not taken yet (0 where that cannot be read)."""
    sock = transport.get_extra_info("socket")
    if _SEND_QUEUE is None or sock is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), _SEND_QUEUE, b"\0\0\0\0"))[0])
    except (OSError, ValueError):  # a closed socket (fileno -1) or one without the ioctl
        return 0


def _raw_response(exc: Exception) -> bytes:
    """A whole HTTP/1.1 response that closes the connection: the status and OpenAI error of ``exc``."""
    reply = describe(exc)
    body = reply.body.model_dump_json().encode()
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
        reply.status,
        HTTPStatus(reply.status).phrase.encode(),
        len(body),
    )
    return head + body


class _CoalescingTransport:
    """A transport that sends a response's head together with the start of its body.

    uvicorn writes a response's status line and headers, then its body, as
    two writes; on loopback each is a ``send`` that wakes the client. A head
    is held until the next write (the body, in the same ASGI step for a JSON
    answer) and sent with it, or at the end of the current pass of the event
    loop (``call_soon``: a stream whose first event comes later). Every other
    write goes straight out, so a stream's events pay nothing for this.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._head is not None:
            data, self._head = self._head + bytes(data), None
        elif data[:5] == b"HTTP/":  # a status line and headers, from uvicorn's protocol
            self._head = bytes(data)
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        head, self._head = self._head, None
        if head is not None and not self._transport.is_closing():
            self._transport.write(head)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._head or b"")

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._head = None
        self._transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        # is_closing, get_extra_info, pause_reading, resume_reading, set_protocol...: the socket's own.
        return getattr(self._transport, name)


# The guard reads and extends what uvicorn's two HTTP/1.1 protocols have in common; mypy checks it
# against the h11 one.
if TYPE_CHECKING:
    _Protocol = H11Protocol
else:
    _Protocol = object


class _ConnectionGuard(_Protocol):
    """The limits above, over either of uvicorn's protocols; ``on_cut`` hears of each connection they end."""

    def __init__(
        self,
        *args: Any,
        header_timeout: float,
        write_timeout: float,
        on_cut: Callable[[CutReason], None] = lambda reason: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.write_timeout = write_timeout
        self.on_cut = on_cut
        self._header_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        #: Bytes pending (the write buffer and the kernel's send queue) when the stall timer was armed.
        self._pending = 0
        #: Bytes received since the header timer was armed: a request has begun.
        self._received = 0
        self._request_cycle: object = None

    # --- headers --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel(self._header_timer)
        self._received = 0
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        super().data_received(data)
        self._check_request_started()
        if self._header_timer is not None and self._received > MAX_HEAD_BYTES and not self.transport.is_closing():
            error = HeadersTooLargeError(f"the request line and headers exceed {MAX_HEAD_BYTES:,} bytes")
            self._cut_before_request("headers_too_large", error)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # for the next request on this connection
            self._check_request_started()  # a pipelined one may have started already

    def _check_request_started(self) -> None:
        """Stop the header timer once a new request's headers are in (uvicorn made its cycle)."""
        if self.cycle is not None and self.cycle is not self._request_cycle:
            self._request_cycle = self.cycle
            self._cancel(self._header_timer)
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if not self._received:  # an idle connection, closed as keep-alive would
            self.transport.close()
            return
        error = RequestTimeoutError(f"the request headers did not arrive within {self.header_timeout:g}s")
        self._cut_before_request("header_timeout", error)

    def _cut_before_request(self, reason: CutReason, error: Exception) -> None:
        self.on_cut(reason)
        self._refuse(error)

    def _refuse(self, error: Exception) -> None:
        """Answer ``error`` and close: written directly, since there is no request to answer yet."""
        self.transport.write(_raw_response(error))
        self.transport.close()

    # --- writes ---------------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_writes()

    def _watch_writes(self) -> None:
        self._cancel(self._stall_timer)
        self._pending = self._pending_bytes()
        self._stall_timer = self.loop.call_later(self.write_timeout, self._check_progress)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel(self._stall_timer)
        self._stall_timer = None

    def _pending_bytes(self) -> int:
        return self.transport.get_write_buffer_size() + _kernel_send_queue(self.transport)

    def _check_progress(self) -> None:
        # While paused nothing new is written, so fewer pending bytes mean the client took some.
        if self._pending_bytes() < self._pending:
            self._watch_writes()
            return
        self._stall_timer = None
        self.on_cut("write_stall")
        logger.info("dropped a client that read nothing for %gs", self.write_timeout)
        # abort, not close: close would wait for the client to read what is buffered.
        self.transport.abort()

    # --- the rest ------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel(self._header_timer)
        self._cancel(self._stall_timer)
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own 400 for unparseable HTTP is plain text; clients here expect OpenAI's JSON.
        self._refuse(InvalidRequestError(f"malformed HTTP request: {msg}", code="malformed_http"))

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()


class GuardedH11Protocol(_ConnectionGuard, H11Protocol):
    """uvicorn's h11 protocol (pure Python) with the limits above."""


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(_ConnectionGuard, HttpToolsProtocol):  # type: ignore[misc]  # mypy sees the guard as h11
        """uvicorn's httptools protocol (a C parser: a fraction of h11's CPU per request) with the limits above."""


def guarded_protocol(**options: Any) -> Callable[..., asyncio.Protocol]:
    """What to give ``uvicorn.Config(http=...)`` (uvicorn adds its own arguments): the limits above
    over httptools' parser when it is installed, else over h11's."""
    protocol = GuardedH11Protocol if HttpToolsProtocol is None else GuardedHttpToolsProtocol
    return functools.partial(protocol, **options)
