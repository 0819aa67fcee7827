"""Long calls: the inactivity timeout, the deadline, and context overflow on real servers.

``bench/fastbackend.py`` streams tokens at a set rate over real loopback HTTP;
a raw asyncio server goes silent part way; llama-cpp-python's own server
with a 512-token context refuses prompts that do not fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from harness import fast_backend
from pacore import DeadlineExceededError, GenerationParams, RouterBackend, asample, asolve
from pacore.backends.base import RetryPolicy
from pacore.backends.openai_http import OpenAIBackend
from pacore.errors import BackendError, ContextOverflowError
from pacore.trace import TrajectoryFinished, TrajectoryProgress

pytestmark = pytest.mark.http

MESSAGES = [{"role": "user", "content": "q"}]
NO_RETRY = RetryPolicy(max_attempts=1)
#: The inactivity timeout: 40 times the 50 ms between two tokens at 20 tokens a second, so that a
#: loaded machine's stall (of this process or of the server's) never passes for a silent server.
TIMEOUT_S = 2.0
#: The slow stream's tokens at 20 a second: 3 s, longer than the timeout, never 2 s without a byte.
SLOW_TOKENS = 60


# --- the timeout limits silence, not length ---------------------------------------------


async def test_a_slow_stream_outlives_the_timeout_and_completes() -> None:
    with fast_backend("--tokens-per-s", 20, "--completion-tokens", SLOW_TOKENS) as server:
        async with OpenAIBackend(server.url, model="fast", timeout=TIMEOUT_S, retry=NO_RETRY) as backend:
            progress: list[tuple[int, int]] = []
            started = time.perf_counter()
            completions = await backend.generate(
                MESSAGES, 3, GenerationParams(), on_progress=lambda i, t: progress.append((i, t))
            )
            elapsed = time.perf_counter() - started
            deltas: list[str] = []
            answer = await backend.stream(MESSAGES, GenerationParams(), lambda c, r: deltas.append(c))
        (stats,) = server.stats()
    assert elapsed > 1.4 * TIMEOUT_S  # paced by the server: a limit on the whole call would have cut it
    assert [len(c.text.split()) for c in completions] == [SLOW_TOKENS] * 3 and all(c.ok for c in completions)
    assert sum(c.completion_tokens for c in completions) == 3 * SLOW_TOKENS
    assert stats["calls"] == 2 and stats["samples"] == 4  # n=3 streamed in one call, then the answer
    # Each sample's progress, token by token.
    assert [t for i, t in progress if i == 2] == list(range(1, SLOW_TOKENS + 1))
    assert answer.ok and len(deltas) == SLOW_TOKENS and "".join(deltas) == answer.text


async def test_a_server_silent_for_longer_than_the_timeout_is_cut_with_kind_timeout() -> None:
    # Headers come at once, then nothing for 60 s.
    with fast_backend("--ttft-ms", 60_000) as server:
        async with OpenAIBackend(server.url, model="fast", timeout=TIMEOUT_S, retry=NO_RETRY) as backend:
            started = time.perf_counter()
            with pytest.raises(BackendError) as caught:
                await backend.generate(MESSAGES, 1, GenerationParams())
    assert caught.value.kind == "timeout" and f"sent nothing for {TIMEOUT_S:g}s" in str(caught.value)
    assert time.perf_counter() - started < 30  # cut by the timeout, long before the first token


@contextlib.asynccontextmanager
async def silent_after(pieces: int) -> AsyncIterator[str]:
    """A server streaming ``pieces`` deltas, then going silent without closing; yields its URL."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(pieces):
            event = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}).encode()
            writer.write(b"%x\r\n%s\n\n\r\n" % (len(event) + 2, event))
            await writer.drain()
            await asyncio.sleep(0.05)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


async def test_a_stream_that_goes_silent_part_way_is_cut_with_kind_timeout() -> None:
    async with silent_after(4) as url, OpenAIBackend(url, model="m", timeout=TIMEOUT_S, retry=NO_RETRY) as backend:
        with pytest.raises(BackendError) as caught:
            await backend.generate(MESSAGES, 1, GenerationParams())
        assert caught.value.kind == "timeout"
        # The final answer's deltas were shown: its partial text is kept in the failed trajectory.
        answer = await backend.stream(MESSAGES, GenerationParams(), lambda c, r: None)
    assert answer.error_kind == "timeout" and answer.text == "w0 w1 w2 w3 "


async def test_the_deadline_still_bounds_the_whole_request() -> None:
    with fast_backend("--tokens-per-s", 20, "--completion-tokens", 100) as server:
        async with OpenAIBackend(server.url, model="fast", timeout=TIMEOUT_S, retry=NO_RETRY) as backend:
            events: list = []
            started = time.perf_counter()
            with pytest.raises(DeadlineExceededError) as caught:
                await asolve("q", schedule=[2], backend=backend, deadline=1.2, on_event=events.append)
    assert time.perf_counter() - started >= 1.2
    assert "deadline of 1.2s exceeded in round 1" in str(caught.value)
    # Meanwhile the progress showed the tokens streaming in, and the deadline (not the end of
    # the 5 s streams) ended the request: no trajectory got all its 100 tokens. No upper bound
    # on the wall time, which a busy machine's scheduling would stretch.
    progress = [e for e in events if isinstance(e, TrajectoryProgress)]
    assert progress and 0 < max(max(e.tokens.values()) for e in progress) < 100
    assert not any(isinstance(e, TrajectoryFinished) for e in events)


# --- context overflow on a real llama.cpp server ----------------------------------------------

SMALL_CONTEXT = 512
#: About 600 tokens: more than the small server's context, well within the default one's.
LONG_PROMPT = "Summarize: " + " ".join(f"item {i} is red;" for i in range(80))


@pytest.fixture(scope="module")
def small_context_url() -> Iterator[str]:
    from llama_server import llama_server
    from pacore.backends.llama_cpp import default_model_path

    with llama_server(default_model_path(), n_ctx=SMALL_CONTEXT) as url:
        yield url


async def test_a_prompt_longer_than_the_servers_context_fails_that_call_with_kind_context(small_context_url) -> None:
    async with OpenAIBackend(small_context_url, retry=NO_RETRY) as backend:
        long = [{"role": "user", "content": LONG_PROMPT}]
        with pytest.raises(ContextOverflowError) as caught:
            await backend.generate(long, 1, GenerationParams(max_tokens=16))
        error = caught.value
        assert (error.kind, error.fatal, error.context_tokens) == ("context", False, SMALL_CONTEXT)
        assert error.prompt_tokens is not None and error.prompt_tokens > SMALL_CONTEXT
        assert "does not fit the context of backend" in str(error)
        # The streamed final answer meets the same refusal.
        with pytest.raises(ContextOverflowError):
            await backend.stream(long, GenerationParams(max_tokens=16), lambda c, r: None)


async def test_calls_that_overflow_one_endpoint_fail_and_the_others_go_on(small_context_url, llama_server_url) -> None:
    # A router over a 512-token and a 4096-token server: the round's calls are
    # spread over both; those sent to the small one fail with a clear reason.
    small = OpenAIBackend(small_context_url, retry=NO_RETRY, n_mode="off")
    large = OpenAIBackend(llama_server_url, retry=NO_RETRY, n_mode="off")
    async with RouterBackend([small, large]) as router:
        trajectories = await asample(LONG_PROMPT, 4, backend=router, params=GenerationParams(max_tokens=4))
    failed = [t for t in trajectories if not t.ok]
    assert len(failed) == 2 and len(trajectories) == 4
    assert all(t.error_kind == "context" and "does not fit the context" in t.error for t in failed)
    assert all(t.text and t.completion_tokens > 0 for t in trajectories if t.ok)
