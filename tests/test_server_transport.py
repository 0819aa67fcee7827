"""The server's write coalescing: a response's head leaves with its body, in one send."""

from __future__ import annotations

import asyncio

from pacore.server.transport import _CoalescingTransport

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
STREAM_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.buffered = 0
        self.closed = False
        self.aborted = False

    def write(self, data) -> None:  # type: ignore[no-untyped-def]
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name, default=None):  # type: ignore[no-untyped-def]
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def pass_of_the_loop() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def coalescing() -> tuple[_CoalescingTransport, RecordingTransport]:
    real = RecordingTransport()
    return _CoalescingTransport(real, asyncio.get_running_loop()), real


async def test_a_json_answer_leaves_in_one_write_at_once():
    transport, real = coalescing()
    transport.write(HEAD)
    assert real.writes == [] and transport.get_write_buffer_size() == len(HEAD)
    transport.write(memoryview(b"{}"))
    assert real.writes == [HEAD + b"{}"]  # no wait for the end of the pass
    transport.write(b"")  # h11's end of a sized body: nothing to send
    await pass_of_the_loop()
    assert real.writes == [HEAD + b"{}"] and transport.get_write_buffer_size() == 0


async def test_a_streams_head_waits_at_most_one_pass_and_its_events_none():
    transport, real = coalescing()
    transport.write(STREAM_HEAD)
    await pass_of_the_loop()  # the first event is not there yet: the head goes alone
    assert real.writes == [STREAM_HEAD]
    transport.write(b"9\r\ndata: 1\n\n\r\n")
    transport.write(b"9\r\ndata: 2\n\n\r\n")
    assert real.writes == [STREAM_HEAD, b"9\r\ndata: 1\n\n\r\n", b"9\r\ndata: 2\n\n\r\n"]


async def test_close_sends_a_held_head_first_and_abort_drops_it():
    transport, real = coalescing()
    transport.write(HEAD)
    transport.close()
    assert real.writes == [HEAD] and real.closed
    await pass_of_the_loop()  # the scheduled flush finds nothing left to send
    assert real.writes == [HEAD]

    transport, cut = coalescing()
    transport.write(HEAD)
    transport.abort()
    await pass_of_the_loop()
    assert cut.writes == [] and cut.aborted


async def test_the_rest_is_the_socket_transports_own():
    transport, real = coalescing()
    real.buffered = 7
    transport.write(HEAD)
    assert transport.get_write_buffer_size() == 7 + len(HEAD)  # the socket's buffer and the held head
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)
    assert not transport.is_closing()
