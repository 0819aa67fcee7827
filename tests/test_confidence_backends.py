"""Token confidence from every backend (issue 13): what is asked for, what is read, and cancelling.

Scripted servers (httpx.MockTransport, or a raw loopback socket for cancelling)
produce every shape of logprobs on demand; the real checks run llama-cpp-python's
server (marker ``http``) and the embedded model (marker ``model``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import httpx
import pytest

import pacore
from pacore.backends.base import BaseBackend, Completion, GenerationParams, Message
from pacore.backends.llama_cpp import LlamaCppBackend, _load
from pacore.backends.openai_http import OpenAIBackend
from pacore.backends.router import RouterBackend
from pacore.confidence import token_confidence
from pacore.errors import BackendError
from test_openai_backend import FAST_RETRY, MESSAGES, Server, chat, sse

EVENT_STREAM = {"content-type": "text/event-stream"}
WITH_LOGPROBS = GenerationParams(max_tokens=16, top_logprobs=2)


def token(*logprobs: float) -> dict:
    """One ``logprobs.content`` entry whose alternatives have these logprobs (the first was sampled)."""
    alternatives = [{"token": f"t{i}", "logprob": value, "bytes": None} for i, value in enumerate(logprobs)]
    return {"token": "t0", "logprob": logprobs[0], "bytes": None, "top_logprobs": alternatives}


# Confidences: -mean of the alternatives' logprobs.
SURE, UNSURE, MIDDLING = token(-1.0, -3.0), token(-0.5, -1.5), token(-2.0, -4.0)  # 2.0, 1.0, 3.0


def chunk(
    index: int = 0, content: str = "", reasoning: str = "", tokens: Sequence[dict] = (), finish: str | None = None
) -> dict:
    delta = {"content": content} if content else {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    choice: dict = {"index": index, "delta": delta, "finish_reason": finish}
    if tokens:
        choice["logprobs"] = {"content": list(tokens)}
    return {"choices": [choice]}


def streams(*events: dict | str) -> Server:
    body = sse(*events, "[DONE]")
    return Server(lambda request, _: httpx.Response(200, content=body, headers=EVENT_STREAM))


def recorder() -> tuple[list[tuple[int, list[float]]], object]:
    heard: list[tuple[int, list[float]]] = []
    return heard, lambda index, values: heard.append((index, list(values)))


# --- what is asked ------------------------------------------------------------------------------


async def test_logprobs_are_asked_only_when_top_logprobs_is_set():
    server = Server(lambda request, body: httpx.Response(200, json=chat("5")))
    async with server.backend() as backend:
        await backend.generate(MESSAGES, 1, GenerationParams(max_tokens=16, seed=1))
        await backend.generate(MESSAGES, 1, GenerationParams(max_tokens=16, seed=1, top_logprobs=3))
    plain, asking = server.requests[0].content, server.bodies[1]
    # Off: not a byte about logprobs (the golden-bytes tests pin the rest).
    assert b"logprobs" not in plain
    assert asking.pop("logprobs") is True and asking.pop("top_logprobs") == 3
    assert asking == json.loads(plain)


# --- what is read -------------------------------------------------------------------------------


async def test_streamed_logprobs_become_token_confidences_reasoning_included():
    server = streams(
        chunk(reasoning="2+3", tokens=[SURE]),
        chunk(content="The", tokens=[UNSURE]),
        ": ping",
        chunk(content=" end", tokens=[MIDDLING, SURE]),
        chunk(finish="stop"),
    )
    heard, on_confidence = recorder()
    async with server.backend() as backend:
        (completion,) = await backend.generate(MESSAGES, 1, WITH_LOGPROBS, on_confidence=on_confidence)
    assert completion.ok and (completion.text, completion.reasoning) == ("The end", "2+3")
    assert completion.token_confidences == [2.0, 1.0, 3.0, 2.0]
    # Heard as the chunks came, not at the end.
    assert heard == [(0, [2.0]), (0, [1.0]), (0, [3.0, 2.0])]


async def test_n_streamed_samples_keep_their_confidences_apart_by_index():
    server = streams(
        chunk(0, "a", tokens=[SURE]),
        chunk(1, "b", tokens=[UNSURE]),
        chunk(1, "c", tokens=[MIDDLING]),
        chunk(0, finish="stop"),
        chunk(1, finish="stop"),
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}},
    )
    heard, on_confidence = recorder()
    async with server.backend() as backend:
        completions = await backend.generate(MESSAGES, 2, WITH_LOGPROBS, on_confidence=on_confidence)
    assert server.bodies[0]["n"] == 2 and len(server.requests) == 1
    assert [c.text for c in completions] == ["a", "bc"]
    assert [c.token_confidences for c in completions] == [[2.0], [1.0, 3.0]]
    assert heard == [(0, [2.0]), (1, [1.0]), (1, [3.0])]


async def test_a_server_that_returns_no_logprobs_leaves_confidence_unset():
    server = streams(chunk(content="5"), chunk(finish="stop"))
    heard, on_confidence = recorder()
    async with server.backend() as backend:
        (completion,) = await backend.generate(MESSAGES, 1, WITH_LOGPROBS, on_confidence=on_confidence)
    assert completion.ok and completion.text == "5"
    assert completion.token_confidences is None and heard == []


async def test_malformed_logprobs_are_skipped_not_fatal():
    odd = {"token": "x", "logprob": -1.0, "top_logprobs": [{"token": "x", "logprob": "high"}]}
    server = streams(
        chunk(content="a", tokens=[SURE, odd, {"top_logprobs": None}, "junk"]),
        {"choices": [{"index": 0, "delta": {"content": "b"}, "logprobs": {"content": "junk"}}]},
        chunk(finish="stop"),
    )
    async with server.backend() as backend:
        (completion,) = await backend.generate(MESSAGES, 1, WITH_LOGPROBS)
    assert completion.ok and completion.text == "ab" and completion.token_confidences == [2.0]


async def test_a_plain_json_answer_gives_confidences_per_choice():
    def reply(request, body):
        payload = chat("a", "b")
        payload["choices"][0]["logprobs"] = {"content": [SURE, UNSURE]}
        payload["choices"][1]["logprobs"] = {"content": [MIDDLING]}
        return httpx.Response(200, json=payload)

    server = Server(reply)
    heard, on_confidence = recorder()
    async with server.backend() as backend:
        completions = await backend.generate(MESSAGES, 2, WITH_LOGPROBS, on_confidence=on_confidence)
    assert [c.token_confidences for c in completions] == [[2.0, 1.0], [3.0]]
    assert heard == [(0, [2.0, 1.0]), (1, [3.0])]


async def test_samples_fetched_as_separate_calls_report_under_their_own_index():
    # The server ignores n: the second sample comes from a call of its own, seeded seed + 1.
    def one_choice(request, body):
        seed = float(body["seed"])
        return httpx.Response(
            200,
            content=sse(chunk(content="x", tokens=[token(-seed)]), chunk(finish="stop"), "[DONE]"),
            headers=EVENT_STREAM,
        )

    server = Server(one_choice)
    heard, on_confidence = recorder()
    async with server.backend() as backend:
        completions = await backend.generate(
            MESSAGES, 2, GenerationParams(seed=5, top_logprobs=1), on_confidence=on_confidence
        )
    assert [c.token_confidences for c in completions] == [[5.0], [6.0]]
    assert sorted(heard) == [(0, [5.0]), (1, [6.0])]


async def test_the_router_passes_on_confidence_to_members_that_take_it():
    class Older(BaseBackend):
        """A third-party backend written before on_confidence."""

        async def generate(self, messages: Sequence[Message], n: int, params: GenerationParams) -> list[Completion]:
            return [Completion(text="older", finish_reason="stop")] * n

    server = streams(chunk(content="5", tokens=[SURE]), chunk(finish="stop"))
    heard, on_confidence = recorder()
    router = RouterBackend([server.backend(), Older()])
    async with router:
        first = await router.generate(MESSAGES, 1, WITH_LOGPROBS, on_confidence=on_confidence)
        second = await router.generate(MESSAGES, 1, WITH_LOGPROBS, on_confidence=on_confidence)
    by_text = {c.text: c for c in (*first, *second)}
    assert by_text["5"].token_confidences == [2.0] and by_text["older"].token_confidences is None
    assert heard == [(0, [2.0])]


async def test_asolve_records_each_trajectorys_confidence():
    server = streams(chunk(content="The answer is 5.", tokens=[SURE, UNSURE, MIDDLING]), chunk(finish="stop"))
    async with server.backend() as backend:
        result = await pacore.asolve("What is 2+3?", schedule=[2], backend=backend, params=WITH_LOGPROBS)
    trajectories = [t for rnd in result.rounds for t in rnd.trajectories]
    assert len(trajectories) == 3
    for trajectory in trajectories:
        assert trajectory.confidence is not None
        assert trajectory.confidence.mean == pytest.approx(2.0)
        assert trajectory.confidence.lowest_group == pytest.approx(2.0)  # 3 tokens: one window
        assert trajectory.confidence.token_count == 3 and trajectory.confidence.tokens is None
    assert all(body["logprobs"] is True for body in server.bodies)


async def test_without_top_logprobs_the_trace_has_no_confidence():
    server = streams(chunk(content="The answer is 5.", tokens=[SURE]), chunk(finish="stop"))
    async with server.backend() as backend:
        result = await pacore.asolve("What is 2+3?", schedule=[2], backend=backend, params=GenerationParams())
    # Asked for nothing, recorded nothing, even from a server that sends logprobs anyway.
    assert all(t.ok and t.confidence is None for rnd in result.rounds for t in rnd.trajectories)
    assert all(b"logprobs" not in request.content for request in server.requests)


# --- cancelling ---------------------------------------------------------------------------------


async def test_cancelling_a_streaming_call_closes_its_connection():
    """A cancelled call hangs up mid-stream, which is how vLLM and llama.cpp learn to abort the request."""
    hung_up = asyncio.Event()
    sent_after_cancel: list[int] = []
    cancelled_at: list[float] = []

    async def endless_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        watch = asyncio.ensure_future(reader.read(1))  # b"" once the client hangs up
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        try:
            while not watch.done():
                writer.write(sse(chunk(content="x", tokens=[SURE])))
                await writer.drain()
                if cancelled_at:
                    sent_after_cancel.append(1)
                await asyncio.wait([watch], timeout=0.02)
        except ConnectionError:
            pass
        hung_up.set()
        writer.close()

    server = await asyncio.start_server(endless_stream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    heard: list[float] = []
    three = asyncio.Event()

    def on_confidence(index: int, values: Sequence[float]) -> None:
        heard.extend(values)
        if len(heard) >= 3:
            three.set()

    async with server, OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="m", retry=FAST_RETRY) as backend:
        call = asyncio.create_task(backend.generate(MESSAGES, 1, WITH_LOGPROBS, on_confidence=on_confidence))
        await asyncio.wait_for(three.wait(), timeout=10)
        call.cancel()
        cancelled_at.append(time.monotonic())
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(hung_up.wait(), timeout=10)
    assert len(sent_after_cancel) <= 3


# --- real servers and the embedded model ----------------------------------------------------------

QUESTION = [{"role": "user", "content": "Name a colour."}]
#: Tokens a cancelled embedded generation may still evaluate: the one in progress when the cancel came.
CANCEL_TOKENS = 1


@pytest.mark.http
async def test_llama_cpp_server_logprobs_give_confidences(llama_server_url):
    heard, on_confidence = recorder()
    async with OpenAIBackend(llama_server_url) as backend:
        (completion,) = await backend.generate(
            QUESTION, 1, GenerationParams(max_tokens=4, seed=1, top_logprobs=3), on_confidence=on_confidence
        )
    assert completion.ok and completion.token_confidences is not None
    assert 1 <= len(completion.token_confidences) <= 4
    assert all(value > 0 for value in completion.token_confidences)
    assert [value for _, values in heard for value in values] == completion.token_confidences


@pytest.mark.model
async def test_embedded_model_reports_each_tokens_confidence():
    backend = LlamaCppBackend()
    heard, on_confidence = recorder()
    params = GenerationParams(max_tokens=6, seed=3, top_logprobs=5)
    (completion,) = await backend.generate(QUESTION, 1, params, on_confidence=on_confidence)
    await asyncio.sleep(0)  # let the values relayed from the worker thread run
    assert completion.ok and completion.token_confidences is not None
    assert len(completion.token_confidences) == completion.completion_tokens > 0
    assert all(value > 0 for value in completion.token_confidences)
    streamed = [value for _, values in heard for value in values]
    # The end-of-generation token is heard live but is not a completion token.
    assert streamed[: completion.completion_tokens] == completion.token_confidences
    assert len(streamed) - completion.completion_tokens in (0, 1)
    # Scoring does not change what is sampled.
    (plain,) = await backend.generate(QUESTION, 1, GenerationParams(max_tokens=6, seed=3))
    assert plain.text == completion.text and plain.token_confidences is None


@pytest.mark.model
async def test_embedded_confidences_match_llama_cpp_pythons_own_logprobs():
    """The same figures as llama-cpp-python computes with logits_all=True (greedy, so both sample alike)."""
    from llama_cpp import Llama

    from pacore.backends.llama_cpp import smollm2_path

    path, n_ctx, k = smollm2_path(), 256, 5
    backend = LlamaCppBackend(path, n_ctx=n_ctx)
    (completion,) = await backend.generate(QUESTION, 1, GenerationParams(temperature=0.0, max_tokens=6, top_logprobs=k))
    loaded = _load(backend.path, backend.n_ctx, backend.chat_format, backend.threads)
    prompt, _ = loaded.format(QUESTION)
    tokens = loaded.llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    reference = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False)
    try:
        out = reference.create_completion(tokens, max_tokens=6, temperature=0.0, logprobs=k)
    finally:
        reference.close()
    choice = out["choices"][0]
    assert choice["text"] == completion.text
    tops = choice["logprobs"]["top_logprobs"]
    assert completion.token_confidences is not None and len(tops) == len(completion.token_confidences)
    # Alternatives are keyed by their text there: two that read alike collapse into one, so skip those.
    compared = [
        (ours, token_confidence(sorted(top.values(), reverse=True)[:k]))
        for ours, top in zip(completion.token_confidences, tops, strict=True)
        if len(top) == k
    ]
    assert len(compared) >= len(tops) - 1
    for ours, theirs in compared:
        assert ours == pytest.approx(theirs, abs=1e-3)


@pytest.mark.model
async def test_cancelling_a_live_embedded_generation_frees_the_model_at_the_next_token():
    backend = LlamaCppBackend()
    counted = asyncio.Event()
    call = asyncio.create_task(
        backend.generate(
            QUESTION,
            1,
            GenerationParams(max_tokens=400, seed=5, top_logprobs=5),
            on_confidence=lambda index, values: counted.set(),
        )
    )
    await asyncio.wait_for(counted.wait(), timeout=60)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call  # the worker thread's cancel event is set by now
    loaded = _load(backend.path, backend.n_ctx, backend.chat_format, backend.threads)
    at_cancel = loaded.llama.n_tokens
    # The model has one worker thread: this runs once the cancelled generation has let go of it.
    freed = loaded.executor.submit(lambda: loaded.llama.n_tokens)
    at_free = await asyncio.wait_for(asyncio.wrap_future(freed), timeout=60)
    # Counted in tokens, not seconds, so a loaded machine's slower tokens change nothing: the
    # generation stopped at the token it was computing, not at its 400th.
    assert at_free - at_cancel <= CANCEL_TOKENS, (at_cancel, at_free)
    assert at_free < 200


@pytest.mark.model
async def test_a_call_cancelled_while_reading_a_long_prompt_stops_at_once_and_leaves_the_model_sound():
    backend = LlamaCppBackend()
    short = GenerationParams(max_tokens=6, seed=11)
    (before,) = await backend.generate(QUESTION, 1, short)
    loaded = _load(backend.path, backend.n_ctx, backend.chat_format, backend.threads)
    # About 1,400 tokens: seconds of prompt reading, during which no token is sampled.
    long_prompt = [{"role": "user", "content": "hello world " * 700 + "\nName a colour."}]
    prompt_tokens = len(loaded.llama.tokenize(loaded.format(long_prompt)[0].encode(), add_bos=True, special=True))
    call = asyncio.create_task(backend.generate(long_prompt, 1, GenerationParams(max_tokens=4)))
    async with asyncio.timeout(60):
        while loaded._reading is None:  # the abort check is installed: llama.cpp is reading the prompt
            await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    freed = loaded.executor.submit(lambda: loaded.llama.n_tokens)
    # Stopped inside the prompt (counted in tokens, which a loaded machine does not stretch): read
    # to its end, it would have been cut only at its first generated token.
    assert await asyncio.wait_for(asyncio.wrap_future(freed), timeout=60) < prompt_tokens
    # The aborted prompt left no half-read state behind: the same seeded call gives the same text.
    (after,) = await backend.generate(QUESTION, 1, short)
    assert after.text == before.text


async def test_a_server_that_refuses_logprobs_is_called_without_them():
    refusal = {"error": {"message": "logprobs is not supported with this model", "type": "invalid_request_error"}}

    def reply(request, body):
        if "logprobs" in body:
            return httpx.Response(400, json=refusal)
        return httpx.Response(
            200, content=sse(chunk(content="5"), chunk(finish="stop"), "[DONE]"), headers=EVENT_STREAM
        )

    server = Server(reply)
    async with server.backend() as backend:
        (first,) = await backend.generate(MESSAGES, 1, WITH_LOGPROBS)
        (second,) = await backend.generate(MESSAGES, 1, WITH_LOGPROBS)
    assert first.ok and second.ok and first.token_confidences is None is second.token_confidences
    # Refused once, then never asked again.
    assert ["logprobs" in body for body in server.bodies] == [True, False, False]


async def test_a_400_about_something_else_still_fails_a_call_asking_for_logprobs():
    server = Server(lambda request, body: httpx.Response(400, json={"error": {"message": "temperature out of range"}}))
    async with server.backend() as backend:
        with pytest.raises(BackendError, match="temperature out of range"):
            await backend.generate(MESSAGES, 1, WITH_LOGPROBS)
    assert all("logprobs" in body for body in server.bodies)
