"""The server's write coalescing: what one pass of the event loop writes leaves in one send."""

from __future__ import annotations

import asyncio

from pacore.server.transport import _CoalescingTransport


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


async def test_a_response_head_and_body_written_in_one_step_go_out_in_one_write():
    real = RecordingTransport()
    transport = _CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"")  # h11's end of a sized body: nothing to send
    transport.write(memoryview(b"{}"))
    assert real.writes == [] and transport.get_write_buffer_size() == 40
    await pass_of_the_loop()
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    assert transport.get_write_buffer_size() == 0


async def test_writes_of_separate_steps_are_not_held_back():
    real = RecordingTransport()
    transport = _CoalescingTransport(real, asyncio.get_running_loop())
    for chunk in (b"data: 1\n\n", b"data: 2\n\n"):
        transport.write(chunk)
        await pass_of_the_loop()
    assert real.writes == [b"data: 1\n\n", b"data: 2\n\n"]


async def test_close_sends_what_is_held_first_and_abort_drops_it():
    loop = asyncio.get_running_loop()
    real = RecordingTransport()
    transport = _CoalescingTransport(real, loop)
    transport.write(b"last words")
    transport.close()
    assert real.writes == [b"last words"] and real.closed
    await pass_of_the_loop()  # the scheduled flush finds nothing left to send
    assert real.writes == [b"last words"]

    cut = RecordingTransport()
    transport = _CoalescingTransport(cut, loop)
    transport.write(b"never sent")
    transport.abort()
    await pass_of_the_loop()
    assert cut.writes == [] and cut.aborted


async def test_the_rest_is_the_socket_transports_own():
    real = RecordingTransport()
    real.buffered = 7
    transport = _CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"abc")
    assert transport.get_write_buffer_size() == 10  # the socket's buffer and what is held
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)
    assert not transport.is_closing()
