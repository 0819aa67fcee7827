"""The OpenAI-compatible HTTP backend against scripted servers (httpx.MockTransport).

The real server is exercised in test_http_integration.py; here every status
code, retry and malformed answer can be produced on demand.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

import pacore
from pacore.backends import open_backend
from pacore.backends.base import GenerationParams, RetryPolicy
from pacore.backends.openai_http import (
    CONTEXT_MARGIN_TOKENS,
    MAX_N,
    OpenAIBackend,
    _retry_after,
    context_overflow,
    normalize_base_url,
)
from pacore.errors import BackendError, ContextOverflowError, UsageError

MESSAGES = [{"role": "user", "content": "What is 2+3?"}]
PARAMS = GenerationParams(max_tokens=16)
FAST_RETRY = RetryPolicy(max_attempts=3, backoff_base=0.001, backoff_max=0.01)
SECRET = "sk-test-secret-1234"


def chat(*texts: str, prompt_tokens: int = 7, completion_tokens: int | None = None, **message_extra) -> dict:
    """A chat completion with one choice per text."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, **message_extra},
                "finish_reason": "stop",
            }
            for i, text in enumerate(texts)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(texts) * 3 if completion_tokens is None else completion_tokens,
        },
    }


class Server:
    """A scripted server: ``reply(request, body)`` answers each request; all are recorded."""

    def __init__(self, reply: Callable[[httpx.Request, dict], httpx.Response]) -> None:
        self.reply = reply
        self.requests: list[httpx.Request] = []
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = json.loads(request.content) if request.content else {}
        self.bodies.append(body)
        return self.reply(request, body)

    def backend(self, **options) -> OpenAIBackend:
        options.setdefault("model", "test-model")
        options.setdefault("retry", FAST_RETRY)
        return OpenAIBackend("http://test.invalid:8000/v1", transport=httpx.MockTransport(self), **options)


def ok(payload: dict, **kwargs) -> httpx.Response:
    return httpx.Response(200, json=payload, **kwargs)


def honours_n(request: httpx.Request, body: dict) -> httpx.Response:
    n = body.get("n", 1)
    texts = [str(i) * 10 * (i + 1) for i in range(n)]  # "0"*10, "1"*20, ...
    return ok(chat(*texts, completion_tokens=sum(len(t) for t in texts) // 2))


def ignores_n(request: httpx.Request, body: dict) -> httpx.Response:
    return ok(chat(f"seed {body.get('seed')}"))


# --- requests and answers -------------------------------------------------------


async def test_generate_sends_the_params_and_reads_the_answer():
    server = Server(lambda request, body: ok(chat("5", prompt_tokens=11, completion_tokens=2)))
    params = GenerationParams(temperature=0.6, top_p=0.9, max_tokens=32, seed=3, stop=("</s>",), extra={"top_k": 20})
    async with server.backend(api_key=SECRET) as backend:
        (completion,) = await backend.generate(MESSAGES, 1, params)
    assert (completion.text, completion.finish_reason) == ("5", "stop")
    assert (completion.prompt_tokens, completion.completion_tokens) == (11, 2)
    assert completion.ok and completion.reasoning is None and completion.latency_s > 0
    request, body = server.requests[0], server.bodies[0]
    assert request.method == "POST" and str(request.url) == "http://test.invalid:8000/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    assert body == {
        "messages": MESSAGES,
        "model": "test-model",
        "temperature": 0.6,
        "top_p": 0.9,
        "max_tokens": 32,
        "stop": ["</s>"],
        "top_k": 20,
        "seed": 3,
        # Every call streams, so --timeout only limits silence.
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_unset_max_tokens_and_seed_are_left_out():
    server = Server(lambda request, body: ok(chat("hi")))
    async with server.backend() as backend:
        await backend.generate(MESSAGES, 1, GenerationParams())
    assert set(server.bodies[0]) == {"messages", "model", "temperature", "top_p", "stream", "stream_options"}


async def test_reasoning_content_and_reasoning_are_read():
    for field in ("reasoning_content", "reasoning"):
        server = Server(lambda request, body, field=field: ok(chat("5", **{field: "2+3 is 5"})))
        async with server.backend() as backend:
            (completion,) = await backend.generate(MESSAGES, 1, PARAMS)
        assert (completion.text, completion.reasoning) == ("5", "2+3 is 5")


async def test_a_200_without_choices_is_a_protocol_error_after_retries():
    server = Server(lambda request, body: ok({"error": {"message": "engine overloaded"}}))
    async with server.backend() as backend:
        with pytest.raises(BackendError) as caught:
            await backend.generate(MESSAGES, 1, PARAMS)
    assert caught.value.kind == "protocol" and "engine overloaded" in str(caught.value)
    assert len(server.requests) == FAST_RETRY.max_attempts


# --- n batching -----------------------------------------------------------------------


async def test_n_is_sent_in_one_call_when_the_server_honours_it():
    server = Server(honours_n)
    async with server.backend() as backend:
        completions = await backend.generate(MESSAGES, 3, PARAMS)
        assert backend.max_n == MAX_N
    assert len(server.requests) == 1 and server.bodies[0]["n"] == 3
    assert [c.text for c in completions] == ["0" * 10, "1" * 20, "2" * 30]
    # One usage for the call: prompt tokens once, completion tokens split by length.
    assert [c.prompt_tokens for c in completions] == [7, 0, 0]
    assert [c.completion_tokens for c in completions] == [5, 10, 15]


async def test_n_falls_back_to_parallel_single_calls_when_the_server_returns_one_choice():
    server = Server(ignores_n)
    async with server.backend() as backend:
        completions = await backend.generate(MESSAGES, 3, GenerationParams(seed=7))
        assert backend.max_n == 1
        assert [c.text for c in completions] == ["seed 7", "seed 8", "seed 9"]
        assert server.bodies[0]["n"] == 3 and all("n" not in body for body in server.bodies[1:])
        # Once learnt, later calls fan out straight away.
        more = await backend.generate(MESSAGES, 2, PARAMS)
    assert len(more) == 2 and len(server.requests) == 5
    assert all("n" not in body for body in server.bodies[3:])
    assert all(c.prompt_tokens == 7 and c.completion_tokens == 3 for c in completions)


async def test_n_falls_back_when_the_server_rejects_n_with_400():
    def refuses_n(request, body):
        if "n" in body:
            return httpx.Response(400, json={"error": {"message": "n must be 1"}})
        return ok(chat("one"))

    server = Server(refuses_n)
    async with server.backend() as backend:
        completions = await backend.generate(MESSAGES, 3, PARAMS)
        assert backend.max_n == 1
    assert [c.text for c in completions] == ["one"] * 3
    # The refused call, the same without streaming (maybe stream was refused),
    # the single-sample probe, then the remaining two.
    assert len(server.requests) == 5


async def test_a_400_that_is_not_about_n_is_raised_and_n_is_kept():
    server = Server(lambda request, body: httpx.Response(400, json={"error": {"message": "prompt too long"}}))
    async with server.backend() as backend:
        with pytest.raises(BackendError) as caught:
            await backend.generate(MESSAGES, 3, PARAMS)
        assert backend.max_n == MAX_N
    assert caught.value.kind == "bad_request" and caught.value.fatal
    assert str(caught.value) == "backend rejected the request (HTTP 400): prompt too long"
    # n=3 streamed and plain, then n=1 streamed and plain: nothing helped.
    assert len(server.requests) == 4


async def test_n_mode_off_never_sends_n_and_on_keeps_max_n():
    server = Server(ignores_n)
    async with server.backend(n_mode="off") as backend:
        assert backend.max_n == 1
        assert len(await backend.generate(MESSAGES, 3, PARAMS)) == 3
    assert all("n" not in body for body in server.bodies)
    async with Server(ignores_n).backend(n_mode="on") as backend:
        assert len(await backend.generate(MESSAGES, 3, PARAMS)) == 3
        assert backend.max_n == MAX_N
    with pytest.raises(UsageError):
        OpenAIBackend("http://127.0.0.1:1/v1", n_mode="sometimes")  # type: ignore[arg-type]


async def test_a_failed_single_call_becomes_one_failed_sample():
    def third_fails(request, body):
        return httpx.Response(503) if body.get("seed") == 2 else ok(chat("fine"))

    server = Server(third_fails)
    async with server.backend(n_mode="off") as backend:
        completions = await backend.generate(MESSAGES, 3, GenerationParams(seed=0))
    assert [c.ok for c in completions] == [True, True, False]
    assert completions[2].error_kind == "status" and "HTTP 503" in completions[2].error


# --- retries and errors -------------------------------------------------------------------


async def test_503_is_retried_until_success():
    replies = iter([httpx.Response(503), httpx.Response(502), ok(chat("done"))])
    server = Server(lambda request, body: next(replies))
    async with server.backend() as backend:
        (completion,) = await backend.generate(MESSAGES, 1, PARAMS)
    assert completion.text == "done" and len(server.requests) == 3


async def test_retries_give_up_with_a_status_error():
    server = Server(lambda request, body: httpx.Response(503, json={"error": {"message": "busy"}}))
    async with server.backend() as backend:
        with pytest.raises(BackendError) as caught:
            await backend.generate(MESSAGES, 1, PARAMS)
    error = caught.value
    assert (error.kind, error.status_code, error.fatal) == ("status", 503, False)
    assert str(error) == ("backend http://test.invalid:8000/v1 answered HTTP 503: busy; gave up after 3 attempts")


async def test_retry_after_is_honoured(caplog):
    replies = iter([httpx.Response(429, headers={"Retry-After": "0.05"}), ok(chat("done"))])
    server = Server(lambda request, body: next(replies))
    # Without Retry-After the jittered wait could be anything up to 30 s.
    slow_backoff = RetryPolicy(max_attempts=2, backoff_base=30, backoff_max=60)
    caplog.set_level(logging.INFO, logger="pacore.backends.openai_http")
    started = time.perf_counter()
    async with server.backend(retry=slow_backoff) as backend:
        (completion,) = await backend.generate(MESSAGES, 1, PARAMS)
    assert completion.text == "done"
    assert 0.05 <= time.perf_counter() - started < 5
    assert "retry 1 in 0.05s" in caplog.text


def test_retry_after_accepts_seconds_and_http_dates():
    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 27 < _retry_after(future) <= 30
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    assert _retry_after(past) == 0.0
    # The policy caps what a server may ask for.
    assert RetryPolicy(backoff_max=20).delay(1, 3600.0, 0.5) == 20


async def test_401_is_a_fatal_auth_error_that_never_shows_the_key():
    server = Server(
        lambda request, body: httpx.Response(401, json={"error": {"message": f"Incorrect API key provided: {SECRET}"}})
    )
    async with server.backend(api_key=SECRET) as backend:
        assert SECRET not in backend.name
        with pytest.raises(BackendError) as caught:
            await backend.generate(MESSAGES, 1, PARAMS)
    error = caught.value
    assert (error.kind, error.fatal, error.status_code) == ("auth", True, 401)
    assert str(error) == "backend rejected the API key (HTTP 401): Incorrect API key provided: ***"
    assert len(server.requests) == 1


async def test_the_api_key_comes_from_the_environment(monkeypatch):
    server = Server(lambda request, body: httpx.Response(403))
    monkeypatch.delenv("PACORE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    async with server.backend() as backend:
        with pytest.raises(BackendError, match=r"requires an API key \(HTTP 403\); set PACORE_API_KEY"):
            await backend.generate(MESSAGES, 1, PARAMS)
    assert "authorization" not in server.requests[0].headers
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai-var")
    async with server.backend() as backend:
        with pytest.raises(BackendError, match="rejected the API key"):
            await backend.generate(MESSAGES, 1, PARAMS)
    assert server.requests[-1].headers["authorization"] == "Bearer from-openai-var"
    monkeypatch.setenv("PACORE_API_KEY", "from-pacore-var")
    async with server.backend() as backend:
        with pytest.raises(BackendError):
            await backend.generate(MESSAGES, 1, PARAMS)
    assert server.requests[-1].headers["authorization"] == "Bearer from-pacore-var"


async def test_404_names_the_unknown_model_or_the_wrong_url():
    server = Server(
        lambda request, body: httpx.Response(
            404, json={"error": {"message": f"The model `{body['model']}` does not exist."}}
        )
    )
    async with server.backend(model="x") as backend:
        with pytest.raises(BackendError) as caught:
            await backend.generate(MESSAGES, 1, PARAMS)
    assert (caught.value.kind, caught.value.fatal) == ("not_found", True)
    assert str(caught.value) == "model 'x' not found on backend (HTTP 404): The model `x` does not exist."
    assert len(server.requests) == 1

    server = Server(lambda request, body: httpx.Response(404, json={"detail": "Not Found"}))
    async with server.backend() as backend:
        with pytest.raises(BackendError, match=r"has no /v1/chat/completions \(HTTP 404\); check the URL"):
            await backend.generate(MESSAGES, 1, PARAMS)


async def test_422_is_a_bad_request_without_retries():
    server = Server(lambda request, body: httpx.Response(422, json={"detail": [{"msg": "bad temperature"}]}))
    async with server.backend() as backend:
        with pytest.raises(BackendError) as caught:
            await backend.generate(MESSAGES, 1, PARAMS)
    assert caught.value.kind == "bad_request" and "bad temperature" in str(caught.value)
    # Streamed, then once without streaming in case the server refuses stream: never retried.
    assert len(server.requests) == 2


async def test_malformed_json_is_retried_then_reported():
    replies = iter([httpx.Response(200, content=b"{not json"), ok(chat("fine"))])
    server = Server(lambda request, body: next(replies))
    async with server.backend() as backend:
        (completion,) = await backend.generate(MESSAGES, 1, PARAMS)
    assert completion.text == "fine" and len(server.requests) == 2

    server = Server(lambda request, body: httpx.Response(200, content=b"<html>oops</html>"))
    async with server.backend() as backend:
        with pytest.raises(BackendError) as caught:
            await backend.generate(MESSAGES, 1, PARAMS)
    assert caught.value.kind == "protocol" and "malformed JSON" in str(caught.value)
    assert len(server.requests) == FAST_RETRY.max_attempts


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_closed_port_is_a_connect_error_after_retries():
    port = closed_port()
    retry = RetryPolicy(max_attempts=2, backoff_base=0.001)
    async with OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="m", retry=retry) as backend:
        with pytest.raises(BackendError) as caught:
            await backend.generate(MESSAGES, 1, PARAMS)
    assert (caught.value.kind, caught.value.fatal) == ("connect", False)
    assert str(caught.value) == (
        f"backend http://127.0.0.1:{port}/v1 is unreachable (connection refused); gave up after 2 attempts"
    )


async def test_a_fatal_error_aborts_a_whole_solve():
    server = Server(lambda request, body: httpx.Response(401))
    async with server.backend(api_key=SECRET) as backend:
        with pytest.raises(BackendError) as caught:
            await pacore.asolve("What is 2+3?", schedule=[4], backend=backend, params=PARAMS)
    assert caught.value.kind == "auth" and caught.value.result is not None
    assert len(server.requests) == 1


async def test_cancelling_a_call_aborts_its_http_request():
    received, closed = asyncio.Event(), asyncio.Event()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            received.set()  # read the request, answer nothing, wait for the client to hang up
        closed.set()
        writer.close()

    server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="m") as backend:
        call = asyncio.create_task(backend.generate(MESSAGES, 1, PARAMS))
        await asyncio.wait_for(received.wait(), timeout=30)  # the request is out, waiting for its answer
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(closed.wait(), timeout=30)


# --- model discovery and URLs ------------------------------------------------------------


async def test_the_model_is_discovered_once_from_the_server():
    def reply(request, body):
        if request.url.path == "/v1/models":
            return ok({"object": "list", "data": [{"id": "served-model"}, {"id": "other"}]})
        return ok(chat(body["model"]))

    server = Server(reply)
    async with server.backend(model=None) as backend:
        assert backend.model == "" and backend.name == "openai http://test.invalid:8000/v1"
        results = await asyncio.gather(*(backend.generate(MESSAGES, 1, PARAMS) for _ in range(3)))
        assert backend.name == "openai http://test.invalid:8000/v1 (served-model)"
    assert [c.text for (c,) in results] == ["served-model"] * 3
    assert [r.url.path for r in server.requests].count("/v1/models") == 1


async def test_a_server_without_models_asks_for_one():
    server = Server(lambda request, body: ok({"object": "list", "data": []}))
    async with server.backend(model=None) as backend:
        with pytest.raises(BackendError, match=r"lists no models; name one \(--model\)") as caught:
            await backend.generate(MESSAGES, 1, PARAMS)
    assert caught.value.fatal


def test_base_urls_are_normalized():
    assert str(normalize_base_url("http://127.0.0.1:8080")) == "http://127.0.0.1:8080/v1"
    assert str(normalize_base_url("http://127.0.0.1:8080/v1/")) == "http://127.0.0.1:8080/v1"
    assert str(normalize_base_url("https://h/api/v1/chat/completions")) == "https://h/api/v1"
    for bad in ("ftp://h/v1", "http://", "localhost:8080"):
        with pytest.raises(UsageError, match="invalid backend URL"):
            normalize_base_url(bad)
    backend = open_backend("http://user:pw@127.0.0.1:8080", model="m", api_key=SECRET)
    assert isinstance(backend, OpenAIBackend)
    assert backend.name == "openai http://127.0.0.1:8080/v1 (m)"


# --- streaming -------------------------------------------------------------------------------


def sse(*events: dict | str) -> bytes:
    """An SSE body: dicts as JSON data, strings as raw data, ``:``-strings as comments."""

    def line(event: dict | str) -> str:
        if isinstance(event, dict):
            return f"data: {json.dumps(event)}"
        return event if event.startswith(":") else f"data: {event}"

    return "".join(f"{line(event)}\n\n" for event in events).encode()


def delta(content: str = "", reasoning: str = "", finish: str | None = None) -> dict:
    fields = {"content": content} if content else {}
    if reasoning:
        fields["reasoning_content"] = reasoning
    return {"choices": [{"index": 0, "delta": fields, "finish_reason": finish}]}


STREAM = [
    {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
    delta(reasoning="2+3"),
    delta("The answer"),
    ": ping",
    delta(" is 5."),
    delta(finish="stop"),
]
USAGE = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}


def streaming(body: bytes) -> Server:
    headers = {"content-type": "text/event-stream"}
    return Server(lambda request, _: httpx.Response(200, content=body, headers=headers))


async def test_stream_delivers_deltas_and_reads_the_usage_chunk():
    server = streaming(sse(*STREAM, USAGE, "[DONE]"))
    deltas: list[tuple[str, str]] = []
    async with server.backend() as backend:
        completion = await backend.stream(MESSAGES, PARAMS, lambda c, r: deltas.append((c, r)))
    assert deltas == [("", "2+3"), ("The answer", ""), (" is 5.", "")]
    assert (completion.text, completion.reasoning) == ("The answer is 5.", "2+3")
    assert completion.finish_reason == "stop"
    assert (completion.prompt_tokens, completion.completion_tokens) == (9, 4)
    assert server.bodies[0]["stream"] is True
    assert server.bodies[0]["stream_options"] == {"include_usage": True}


async def test_stream_chunks_pydantic_refuses_are_read_as_the_standard_library_reads_them():
    # A lone surrogate escape (a token cut inside a UTF-16 pair) and bytes after the JSON value.
    chunks = [
        '{"choices": [{"index": 0, "delta": {"content": "cut \\ud83d"}, "finish_reason": null}]}',
        '{"choices": [{"index": 0, "delta": {"content": " here"}, "finish_reason": "stop"}]} ;',
    ]
    async with streaming(sse(*chunks, "[DONE]")).backend() as backend:
        completion = await backend.stream(MESSAGES, PARAMS, lambda c, r: None)
    assert completion.finish_reason == "stop"
    assert completion.text == "cut \ufffd here"  # as in every completion, a lone surrogate is replaced


async def test_stream_without_usage_counts_chunks_and_estimates_the_prompt():
    server = streaming(sse(*STREAM, "[DONE]"))
    async with server.backend() as backend:
        completion = await backend.stream(MESSAGES, PARAMS, lambda c, r: None)
    # About 4 characters a token of the messages sent, rather than a free prompt.
    messages_bytes = len(json.dumps(MESSAGES, separators=(",", ":")))
    assert (completion.prompt_tokens, completion.completion_tokens) == (-(-messages_bytes // 4), 3)


def cut(body: bytes, how: str, line_end: bytes) -> list[bytes]:
    """``body`` as the pieces a server's writes and the network may deliver it in."""
    if how == "event":  # one event per chunk, as servers write them
        return [event + line_end * 2 for event in body.split(line_end * 2)[:-1]]
    if how == "whole":
        return [body]
    size = int(how)
    return [body[start : start + size] for start in range(0, len(body), size)]


@pytest.mark.parametrize("how", ["event", "whole", "1", "7", "50"])
@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"])
async def test_a_stream_reads_the_same_however_its_bytes_are_cut(how: str, line_end: bytes):
    body = sse(*STREAM, USAGE, "[DONE]").replace(b"\n", line_end)
    pieces = cut(body, how, line_end)

    async def chunks():
        for piece in pieces:
            yield piece

    assert b"".join(pieces) == body
    headers = {"content-type": "text/event-stream"}
    server = Server(lambda request, _: httpx.Response(200, content=chunks(), headers=headers))
    async with server.backend() as backend:
        (completion,) = await backend.generate(MESSAGES, 1, PARAMS)
    assert (completion.text, completion.reasoning) == ("The answer is 5.", "2+3")
    assert (completion.finish_reason, completion.prompt_tokens, completion.completion_tokens) == ("stop", 9, 4)


async def test_a_compressed_event_stream_is_decoded():
    # The raw stream is read only when the body is not encoded.
    body = gzip.compress(sse(*STREAM, USAGE, "[DONE]"))
    headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    server = Server(lambda request, _: httpx.Response(200, content=body, headers=headers))
    async with server.backend() as backend:
        (completion,) = await backend.generate(MESSAGES, 1, PARAMS)
    assert (completion.text, completion.reasoning, completion.completion_tokens) == ("The answer is 5.", "2+3", 4)


async def test_a_final_answer_stream_that_breaks_after_deltas_keeps_its_partial_text():
    # Its deltas were already shown, so it is not retried: a failed completion holds what came.
    server = streaming(sse(*STREAM[:3]))
    deltas = []
    async with server.backend() as backend:
        completion = await backend.stream(MESSAGES, PARAMS, lambda c, r: deltas.append(c))
    assert not completion.ok and completion.error_kind == "protocol"
    assert "ended the stream before the completion finished" in completion.error
    assert "the partial text is kept" in completion.error
    assert (completion.text, completion.reasoning) == ("The answer", "2+3")
    assert completion.completion_tokens == 2
    assert len(deltas) == 2 and len(server.requests) == 1


async def test_a_stream_cut_by_the_network_is_a_protocol_error():
    async def cut_off():
        yield sse(*STREAM[:3])
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    headers = {"content-type": "text/event-stream"}
    server = Server(lambda request, body: httpx.Response(200, content=cut_off(), headers=headers))
    async with server.backend() as backend:
        completion = await backend.stream(MESSAGES, PARAMS, lambda c, r: None)
        assert completion.error_kind == "protocol" and "the connection broke" in completion.error
        # generate's text went nowhere yet: it is retried from scratch, then gives up.
        with pytest.raises(BackendError, match="the connection broke") as caught:
            await backend.generate(MESSAGES, 1, PARAMS)
    assert caught.value.kind == "protocol" and len(server.requests) == 1 + FAST_RETRY.max_attempts


async def test_a_malformed_chunk_is_a_protocol_error():
    server = streaming(sse(STREAM[0], "{broken", *STREAM[1:]))
    async with server.backend() as backend:
        with pytest.raises(BackendError, match="malformed stream chunk") as caught:
            await backend.stream(MESSAGES, PARAMS, lambda c, r: None)
    assert caught.value.kind == "protocol"


@pytest.mark.parametrize(
    "chunk",
    [
        {"choices": [{"index": 0, "delta": {"content": 42}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": ["2+3"]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": {"why": "stop"}}]},
    ],
    ids=["content", "reasoning", "finish_reason"],
)
async def test_a_chunk_with_a_field_of_the_wrong_type_is_a_protocol_error(chunk):
    server = streaming(sse(STREAM[0], chunk, *STREAM[1:], USAGE, "[DONE]"))
    async with server.backend() as backend:
        with pytest.raises(BackendError, match="malformed stream chunk .*not a string") as caught:
            await backend.stream(MESSAGES, PARAMS, lambda c, r: None)
    assert caught.value.kind == "protocol"


async def test_a_stream_that_fails_before_its_first_delta_is_retried():
    headers = {"content-type": "text/event-stream"}
    replies = iter([httpx.Response(503), httpx.Response(200, content=sse(*STREAM, USAGE, "[DONE]"), headers=headers)])
    server = Server(lambda request, body: next(replies))
    async with server.backend() as backend:
        completion = await backend.stream(MESSAGES, PARAMS, lambda c, r: None)
    assert completion.text == "The answer is 5." and len(server.requests) == 2


# --- every call streams -----------------------------------------------------------------------


def choice_delta(index: int, content: str = "", finish: str | None = None) -> dict:
    return {"choices": [{"index": index, "delta": {"content": content} if content else {}, "finish_reason": finish}]}


def interleaved(texts: list[list[str]], usage: dict | None = None) -> bytes:
    """An SSE body streaming each choice's pieces, interleaved as vLLM sends them."""
    events: list[dict | str] = []
    for step in range(max(len(pieces) for pieces in texts)):
        events += [choice_delta(i, pieces[step]) for i, pieces in enumerate(texts) if step < len(pieces)]
    events += [choice_delta(i, finish="stop") for i in range(len(texts))]
    if usage:
        events.append({"choices": [], "usage": usage})
    return sse(*events, "[DONE]")


def streams_n(request: httpx.Request, body: dict) -> httpx.Response:
    n = body.get("n", 1)
    texts = [[f"s{i}"] + [" x"] * i for i in range(n)]  # choice i: 1 + i pieces
    usage = {"prompt_tokens": 7, "completion_tokens": 60}
    return httpx.Response(200, content=interleaved(texts, usage), headers={"content-type": "text/event-stream"})


async def test_n_samples_stream_in_one_call_demultiplexed_by_index():
    server = Server(streams_n)
    progress: list[tuple[int, int]] = []
    async with server.backend() as backend:
        completions = await backend.generate(MESSAGES, 3, PARAMS, on_progress=lambda i, t: progress.append((i, t)))
        assert backend.max_n == MAX_N
    assert len(server.requests) == 1
    assert server.bodies[0]["n"] == 3 and server.bodies[0]["stream"] is True
    assert [c.text for c in completions] == ["s0", "s1 x", "s2 x x"]
    assert all(c.ok and c.finish_reason == "stop" for c in completions)
    # One usage for the call: prompt tokens once, completion tokens split by length.
    assert [c.prompt_tokens for c in completions] == [7, 0, 0]
    assert sum(c.completion_tokens for c in completions) == 60
    assert [c.completion_tokens for c in completions] == [10, 20, 30]
    # Progress per sample, as its chunks arrived.
    assert sorted(progress) == [(0, 1), (1, 1), (1, 2), (2, 1), (2, 2), (2, 3)]


async def test_a_server_streaming_fewer_choices_than_asked_lowers_max_n():
    def one_choice(request, body):
        texts = [[f"seed {body.get('seed')}"]]
        return httpx.Response(200, content=interleaved(texts), headers={"content-type": "text/event-stream"})

    server = Server(one_choice)
    progress: list[tuple[int, int]] = []
    async with server.backend() as backend:
        completions = await backend.generate(
            MESSAGES, 3, GenerationParams(seed=7), on_progress=lambda i, t: progress.append((i, t))
        )
        assert backend.max_n == 1
    assert [c.text for c in completions] == ["seed 7", "seed 8", "seed 9"]
    # Without a usage chunk, each sample counts its text chunks.
    assert [c.completion_tokens for c in completions] == [1, 1, 1]
    # The samples fetched by later calls are reported under their own index.
    assert sorted(progress) == [(0, 1), (1, 1), (2, 1)]


async def test_a_server_that_refuses_stream_is_called_without_it_from_then_on(caplog):
    def refuses_stream(request, body):
        if body.get("stream"):
            return httpx.Response(400, json={"error": {"message": "Unrecognized request argument: stream"}})
        return ok(chat("plain"))

    server = Server(refuses_stream)
    caplog.set_level(logging.INFO, logger="pacore.backends.openai_http")
    deltas = []
    async with server.backend() as backend:
        (first,) = await backend.generate(MESSAGES, 1, PARAMS)
        streamed = await backend.stream(MESSAGES, PARAMS, lambda c, r: deltas.append(c))
    assert first.text == streamed.text == "plain" and deltas == ["plain"]
    assert [body.get("stream", False) for body in server.bodies] == [True, False, False]
    assert "refuses stream=true" in caplog.text


async def test_an_empty_event_stream_is_asked_again_without_streaming_for_the_real_error():
    # llama-cpp-python answers a stream it cannot start with 200 and no events at all.
    def reply(request, body):
        if body.get("stream"):
            return httpx.Response(200, content=b"", headers={"content-type": "text/event-stream"})
        return httpx.Response(400, json=PROMPT_TOO_LONG["sglang"])

    server = Server(reply)
    async with server.backend() as backend:
        with pytest.raises(ContextOverflowError, match="does not fit"):
            await backend.generate(MESSAGES, 1, PARAMS)
    assert [body.get("stream", False) for body in server.bodies] == [True, False]


async def test_a_call_that_keeps_streaming_is_retried_from_scratch_only_before_a_consumer_saw_it():
    headers = {"content-type": "text/event-stream"}
    bodies = iter([sse(*STREAM[:3]), sse(*STREAM, USAGE, "[DONE]")])
    server = Server(lambda request, body: httpx.Response(200, content=next(bodies), headers=headers))
    progress: list[tuple[int, int]] = []
    async with server.backend() as backend:
        (completion,) = await backend.generate(MESSAGES, 1, PARAMS, on_progress=lambda i, t: progress.append((i, t)))
    assert completion.ok and completion.text == "The answer is 5."
    assert completion.failed_attempts == ("protocol",)
    # The count restarts with the new attempt.
    assert progress == [(0, 1), (0, 2), (0, 1), (0, 2), (0, 3)]


# --- context overflow ----------------------------------------------------------------------------

#: One overflow 400 of each server, as (body, context tokens, prompt tokens) with its figures.
OVERFLOWS = {
    "vllm classic": (
        {"object": "error", "message": "This model's maximum context length is 4096 tokens. However, you requested "
         "5000 tokens (1000 in the messages, 4000 in the completion). Please reduce the length of the messages or "
         "completion.", "type": "BadRequestError", "param": None, "code": 400},
        4096, 1000,
    ),
    "vllm max_tokens too large": (
        {"error": {"message": "'max_tokens' or 'max_completion_tokens' is too large: 4000. This model's maximum "
         "context length is 4096 tokens and your request has 1000 input tokens (4000 > 4096 - 1000). None",
         "type": "BadRequestError", "param": None, "code": 400}},
        4096, 1000,
    ),
    "vllm output tokens": (
        {"error": {"message": "This model's maximum context length is 131072 tokens. However, you requested "
         "131072 output tokens and your prompt contains at least 1,000 input tokens, for a total of at least "
         "132072 tokens. Please reduce the length of the input prompt or the number of requested output tokens. "
         "(parameter=input_tokens, value=1000)", "type": "BadRequestError", "param": "input_tokens", "code": 400}},
        131072, 1000,
    ),
    "sglang": (
        {"object": "error", "message": "Requested token count exceeds the model's maximum context length of 4096 "
         "tokens. You requested a total of 5000 tokens: 1000 tokens from the input messages and 4000 tokens for "
         "the completion. Please reduce the number of tokens in the input messages or the completion to fit "
         "within the limit.", "type": "BadRequestError", "param": None, "code": 400},
        4096, 1000,
    ),
    "llama.cpp": (
        {"error": {"code": 400, "message": "request (1000 tokens) exceeds the available context size (4096 tokens), "
         "try increasing it", "type": "exceed_context_size_error", "n_prompt_tokens": 1000, "n_ctx": 4096}},
        4096, 1000,
    ),
    "llama.cpp older": (
        {"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it",
         "type": "exceed_context_size_error", "n_prompt_tokens": 1000, "n_ctx": 4096}},
        4096, 1000,
    ),
    "llama-cpp-python": (
        {"error": {"message": "This model's maximum context length is 4096 tokens. However, you requested 5000 "
         "tokens (1000 in the messages, 4000 in the completion). Please reduce the length of the messages or "
         "completion.", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}},
        4096, 1000,
    ),
    "llama-cpp-python raw": ({"detail": "Requested tokens (1000) exceed context window of 4096"}, 4096, 1000),
}  # fmt: skip
#: Overflows where the prompt alone does not fit.
PROMPT_TOO_LONG = {
    "vllm": {"object": "error", "message": "This model's maximum context length is 4096 tokens. However, your "
             "request has 5000 input tokens. Please reduce the length of the input messages.", "code": 400},
    "vllm classic": {"object": "error", "message": "This model's maximum context length is 4096 tokens. However, "
                     "you requested 5000 tokens in the messages, Please reduce the length of the messages."},
    "sglang": {"object": "error", "message": "The input (5000 tokens) is longer than the model's context length "
               "(4096 tokens).", "code": 400},
    "vllm decoder": {"object": "error", "message": "The decoder prompt (length 5000) is longer than the maximum "
                     "model length of 4096. Make sure that `max_model_len` is no smaller than the number of text "
                     "tokens."},
}  # fmt: skip


@pytest.mark.parametrize("name", list(OVERFLOWS))
def test_each_servers_overflow_message_is_recognised_with_its_figures(name):
    body, context, prompt = OVERFLOWS[name]
    assert context_overflow(body) == (context, prompt)


@pytest.mark.parametrize("name", list(PROMPT_TOO_LONG))
def test_a_prompt_longer_than_the_context_is_recognised(name):
    context, prompt = context_overflow(PROMPT_TOO_LONG[name])
    assert context == 4096 and prompt == 5000


def test_other_errors_are_not_overflows():
    for body in (
        {"error": {"message": "n must be 1"}},
        {"error": {"message": "temperature must be between 0 and 2"}},
        {"detail": [{"msg": "field required"}]},
        "plain text error",
    ):
        assert context_overflow(body) is None


def overflows_above(context: int, prompt: int, body_of=None):
    """A server with a ``context``-token window whose prompts take ``prompt`` tokens."""

    def reply(request, body):
        asked = body.get("max_tokens")
        if prompt >= context or (asked is not None and prompt + asked > context):
            message = (
                body_of(asked)
                if body_of
                else (
                    f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{prompt + (asked or 0)} tokens ({prompt} in the messages, {asked} in the completion)."
                )
            )
            return httpx.Response(400, json={"object": "error", "message": message, "code": 400})
        return ok(chat(f"max_tokens={asked}"))

    return Server(reply)


@pytest.mark.parametrize("name", list(OVERFLOWS))
async def test_an_overflow_is_retried_once_with_max_tokens_that_fits(name):
    body, context, prompt = OVERFLOWS[name]
    replies = iter([httpx.Response(400, json=body), ok(chat("fits"))])
    server = Server(lambda request, _: next(replies))
    async with server.backend() as backend:
        (completion,) = await backend.generate(MESSAGES, 1, GenerationParams(max_tokens=131072))
    assert completion.ok and completion.text == "fits" and completion.failed_attempts == ()
    assert [b["max_tokens"] for b in server.bodies] == [131072, context - prompt - CONTEXT_MARGIN_TOKENS]


async def test_an_overflow_without_figures_is_retried_without_max_tokens():
    server = overflows_above(4096, 1000, body_of=lambda asked: "maximum context length exceeded, sorry")
    async with server.backend() as backend:
        (completion,) = await backend.generate(MESSAGES, 1, GenerationParams(max_tokens=8000))
    assert completion.text == "max_tokens=None"
    assert ["max_tokens" in body for body in server.bodies] == [True, False]


@pytest.mark.parametrize("name", list(PROMPT_TOO_LONG))
async def test_a_prompt_that_does_not_fit_fails_that_call_with_kind_context(name):
    server = Server(lambda request, _: httpx.Response(400, json=PROMPT_TOO_LONG[name]))
    async with server.backend() as backend:
        with pytest.raises(ContextOverflowError) as caught:
            await backend.generate(MESSAGES, 1, GenerationParams(max_tokens=100))
    error = caught.value
    assert (error.kind, error.fatal, error.context_tokens, error.prompt_tokens) == ("context", False, 4096, 5000)
    assert (
        str(error) == "the prompt (5,000 tokens) does not fit the context of backend "
        "http://test.invalid:8000/v1 (4,096 tokens)"
    )
    assert len(server.requests) == 1  # nothing to retry


async def test_an_overflow_is_retried_only_once():
    server = Server(lambda request, _: httpx.Response(400, json=OVERFLOWS["sglang"][0]))
    async with server.backend() as backend:
        with pytest.raises(ContextOverflowError, match="exceed the context") as caught:
            await backend.generate(MESSAGES, 1, GenerationParams(max_tokens=4000))
    assert caught.value.kind == "context" and len(server.requests) == 2


async def test_an_overflowing_trajectory_fails_and_the_round_goes_on():
    # Calls whose prompt is long overflow; the others, and the synthesis, go on.
    def reply(request, body):
        text = body["messages"][-1]["content"]
        if "long" in text:
            return httpx.Response(400, json=PROMPT_TOO_LONG["sglang"])
        return ok(chat("42"))

    server = Server(reply)
    async with server.backend(n_mode="off") as backend:
        result = await pacore.asolve([{"role": "user", "content": "q"}], schedule=[3], backend=backend, params=PARAMS)
        pool = await pacore.asample("a long prompt", 2, backend=backend, params=PARAMS)
    assert result.answer == "42" and result.usage.failed_calls == 0
    assert [t.error_kind for t in pool] == ["context", "context"]
    assert all("does not fit the context" in t.error for t in pool)


# --- reply size cap and the connection pool -------------------------------------------------------


async def test_a_reply_larger_than_the_cap_is_refused_as_a_failed_sample():
    big = "x" * 5000
    headers = {"content-type": "text/event-stream"}
    body = sse(delta(big), delta(big), delta(finish="stop"), "[DONE]")
    streamed = Server(lambda request, _: httpx.Response(200, content=body, headers=headers))
    async with streamed.backend(max_reply_bytes=8000) as backend:
        with pytest.raises(BackendError) as caught:
            await backend.generate(MESSAGES, 1, PARAMS)
        assert caught.value.kind == "too_large" and "8,000 bytes" in str(caught.value)
        assert not caught.value.fatal and len(streamed.requests) == 1  # not retried: it would come back as large
        # In a request, that call's trajectories fail and the others go on.
        pool = await pacore.asample("q", 2, backend=backend, params=PARAMS)
    assert [t.error_kind for t in pool] == ["too_large", "too_large"]

    plain = Server(lambda request, body: ok(chat(big * 2)))
    async with plain.backend(max_reply_bytes=8000) as backend:
        with pytest.raises(BackendError, match="max_reply_bytes") as caught:
            await backend.generate(MESSAGES, 1, PARAMS)
    # Within the cap, the same answers are fine.
    async with plain.backend(max_reply_bytes=20000) as backend:
        (completion,) = await backend.generate(MESSAGES, 1, PARAMS)
    assert completion.text == big * 2


async def test_a_line_without_end_cannot_grow_past_the_cap():
    async def endless():
        while True:
            yield b"data: " + b"y" * 65536

    headers = {"content-type": "text/event-stream"}
    server = Server(lambda request, body: httpx.Response(200, content=endless(), headers=headers))
    async with server.backend(max_reply_bytes=1 << 20) as backend:
        with pytest.raises(BackendError) as caught:
            await backend.generate(MESSAGES, 1, PARAMS)
    assert caught.value.kind == "too_large"


async def test_discarding_a_connection_twice_is_harmless():
    async with Server(lambda request, body: ok(chat("hi"))).backend() as backend:
        await backend.generate(MESSAGES, 1, PARAMS)
        pool = backend._http()
        (client,) = pool._clients
        pool._discard(client)
        pool._discard(client)  # a second Ctrl+C cancels the same call again
        assert pool._clients == []
        (completion,) = await backend.generate(MESSAGES, 1, PARAMS)
    assert completion.text == "hi"


# --- the HTTP transport ----------------------------------------------------------


async def test_pacore_http_transport_httpx_calls_a_real_server_through_httpx_s_own_transport(monkeypatch):
    from harness import fast_backend

    monkeypatch.setenv("PACORE_HTTP_TRANSPORT", "httpx")
    with fast_backend("--completion-tokens", 8) as server:
        async with OpenAIBackend(server.url, model="fast") as backend:
            assert not backend._lean
            (completion,) = await backend.generate(MESSAGES, 1, GenerationParams(max_tokens=8))
    assert completion.ok and completion.completion_tokens == 8


def test_an_unknown_pacore_http_transport_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("PACORE_HTTP_TRANSPORT", "fast")
    with pytest.raises(UsageError, match="PACORE_HTTP_TRANSPORT must be 'lean' or 'httpx', got 'fast'"):
        OpenAIBackend("http://127.0.0.1:8000/v1", model="m")
