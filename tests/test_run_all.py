"""engine.run_all: a round's calls run like a TaskGroup's, with one event-loop pass to wake the round."""

from __future__ import annotations

import asyncio

import pytest

from pacore.engine import run_all


async def test_waits_for_every_coroutine() -> None:
    finished: list[int] = []

    async def call(i: int) -> None:
        await asyncio.sleep(0.01 * (3 - i))
        finished.append(i)

    await run_all([call(i) for i in range(3)])
    assert sorted(finished) == [0, 1, 2]


async def test_the_caller_wakes_one_loop_pass_after_the_last_call() -> None:
    """A TaskGroup would take two passes (a done callback, then the wake-up): under load each
    pass waits behind every other request's stream events (bench/orchestration.py's round gap)."""
    loop = asyncio.get_running_loop()
    events: list[str] = []

    async def call(last: bool) -> None:
        await asyncio.sleep(0.02 if last else 0)
        if last:
            # Runs two passes from now: one to schedule it, one to run it.
            loop.call_soon(loop.call_soon, events.append, "two passes later")

    await run_all([call(False), call(True), call(False)])
    events.append("caller resumed")
    await asyncio.sleep(0)
    assert events == ["caller resumed", "two passes later"]


async def test_the_first_error_cancels_the_rest_and_is_raised() -> None:
    cancelled: list[int] = []

    async def slow(i: int) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    async def failing() -> None:
        await asyncio.sleep(0)
        raise ValueError("fatal")

    with pytest.raises(ValueError, match="fatal"):
        await run_all([slow(0), failing(), slow(1)])
    assert sorted(cancelled) == [0, 1]  # both finished before the error reached the caller


async def test_cancelling_the_caller_cancels_every_call_first() -> None:
    started = asyncio.Event()
    cancelled: list[int] = []

    async def slow(i: int) -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # a call that takes a moment to wind down
            cancelled.append(i)
            raise

    caller = asyncio.create_task(run_all([slow(0), slow(1)]))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert sorted(cancelled) == [0, 1]


async def test_a_deadline_still_ends_the_round() -> None:
    async def slow() -> None:
        await asyncio.sleep(10)

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await run_all([slow(), slow()])
