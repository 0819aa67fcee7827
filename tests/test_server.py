"""``pacore serve`` through the real ``openai`` SDK against a running server.

The server runs with uvicorn on a free loopback port; its backend is a
scripted fake, so every figure (calls, tokens, rounds) is known exactly.
The real embedded model is exercised in test_server_model.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import sqlite3
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fakes import Call, StreamingScriptedBackend, fail
from harness import fast_backend
from pacore.backends.base import Completion
from pacore.schedule import Schedule
from pacore.server import ServerConfig
from server_harness import RunningServer, running_app, running_cli

pytestmark = pytest.mark.http

FINAL = "After checking the references, the answer is 42."
PNG_URL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


def is_synthesis(call: Call) -> bool:
    return "Reference Responses" in call.last_user_text


def reply(call: Call, i: int) -> str:
    """Round-1 samples disagree a little; every synthesis answers FINAL."""
    return FINAL if is_synthesis(call) else f"I think the answer is {40 + (call.number % 3)}."


def backend(**options) -> StreamingScriptedBackend:
    return StreamingScriptedBackend(respond=options.pop("respond", reply), **options)


@pytest.fixture
def fake() -> StreamingScriptedBackend:
    return backend()


@pytest.fixture
def server(fake) -> Iterator[RunningServer]:
    with running_app(fake, ServerConfig(schedule=Schedule.parse([3]))) as running:
        yield running


def client(running: RunningServer, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.api_url, api_key=options.pop("api_key", "unused"), max_retries=0, **options)


def async_client(running: RunningServer, **options) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=running.api_url, api_key=options.pop("api_key", "unused"), max_retries=0, **options
    )


def ask(running: RunningServer, model: str = "scripted", **options):
    openai_client = client(running)  # left open for a stream the caller reads; closed when collected
    try:
        return openai_client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is six times seven?"}], **options
        )
    except BaseException:
        # The error's traceback keeps the client in a reference cycle, whose collection may find its
        # socket before the client's own finalizer closes it (a ResourceWarning): closed here.
        openai_client.close()
        raise


def metric(running: RunningServer, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    text = httpx.get(f"{running.base_url}/metrics", headers=_auth(running)).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _auth(running: RunningServer) -> dict[str, str]:
    keys = running.app.state.pacore.config.api_keys if running.app else ()
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:g}s")
        time.sleep(0.02)


# --- answers ---------------------------------------------------------------------


def test_plain_completion_counts_every_round(server, fake):
    completion = ask(server)

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "scripted"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == FINAL
    assert completion.choices[0].finish_reason == "stop"
    # 3 trajectories + 1 synthesis, and usage adds up every one of them.
    assert len(fake.calls) == 4
    extension = completion.model_extra["pacore"]
    assert extension["schedule"] == [3]
    assert extension["usage_scope"] == "all_rounds"
    assert [(r["k"], r["succeeded"], r["final"]) for r in extension["rounds"]] == [(3, 3, False), (1, 1, True)]
    round_tokens = sum(r["completion_tokens"] for r in extension["rounds"])
    assert completion.usage.completion_tokens == round_tokens == 3 * 6 + len(FINAL.split())
    assert completion.usage.prompt_tokens == sum(r["prompt_tokens"] for r in extension["rounds"])
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert extension["trace_url"] == f"/ui#{completion.id}"


async def test_async_client_gets_the_same_answer(server, fake):
    async with async_client(server) as aclient:
        first, second = await asyncio.gather(
            *(
                aclient.chat.completions.create(model="scripted", messages=[{"role": "user", "content": q}])
                for q in ("one?", "two?")
            )
        )
    assert first.choices[0].message.content == second.choices[0].message.content == FINAL
    assert first.id != second.id
    assert len(fake.calls) == 8


def test_streamed_answer_arrives_in_pieces_after_progress(server, fake):
    stream = client(server).chat.completions.create(
        model="scripted",
        messages=[{"role": "user", "content": "What is six times seven?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    finish_index = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason)
    # Word by word from the backend's own stream, all before the finish chunk.
    assert len(content_chunks) == len(FINAL.split())
    assert all(chunks.index(c) < finish_index for c in content_chunks)
    assert "".join(c.choices[0].delta.content for c in content_chunks) == FINAL
    assert len(fake.streamed) == 1 and is_synthesis(fake.streamed[0])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[finish_index].choices[0].finish_reason == "stop"

    progress = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    assert "round 1/2: 3 trajectories started" in progress
    assert "round 1/2: 3/3 trajectories done" in progress
    assert "synthesizing the final answer from 3 references" in progress
    # Progress comes before the answer.
    first_content = chunks.index(content_chunks[0])
    assert all(
        not (c.choices and c.choices[0].delta.model_extra.get("reasoning_content")) for c in chunks[first_content:]
    )

    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 3 * 6 + len(FINAL.split())
    assert all(c.usage is None for c in chunks[:-1])


async def test_async_stream_without_usage_ends_with_finish(server):
    async with async_client(server) as aclient:
        stream = await aclient.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "Why?"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == FINAL
    assert chunks[-1].model_extra["pacore"]["schedule"] == [3]


def test_passthrough_stream_has_no_progress_lines(server, fake):
    chunks = list(ask(server, model="pacore-1/scripted", stream=True))
    assert len(fake.calls) == 1
    assert not any(c.choices and c.choices[0].delta.model_extra.get("reasoning_content") for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("I think")


# --- schedule selection -------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "calls", "schedule"),
    [
        ("pacore-high/qwen3-8b", 32 + 4 + 1, [32, 4]),
        ("pacore-low/scripted", 4 + 1, [4]),
        ("pacore-16/qwen3-8b", 16 + 1, [16]),
        ("pacore-2,2/scripted", 2 + 2 + 1, [2, 2]),
        ("pacore-1/scripted", 1, []),
        ("pacore-off/scripted", 1, []),
        ("scripted", 3 + 1, [3]),
    ],
)
def test_model_name_selects_the_schedule(server, fake, model, calls, schedule):
    completion = ask(server, model=model)
    assert len(fake.calls) == calls
    assert completion.model == model
    assert completion.model_extra["pacore"]["schedule"] == schedule


def test_extra_body_schedule_wins_over_the_model_name(server, fake):
    completion = ask(server, model="pacore-high/scripted", extra_body={"pacore": {"schedule": [2, 2]}})
    assert completion.model_extra["pacore"]["schedule"] == [2, 2]
    assert [r["k"] for r in completion.model_extra["pacore"]["rounds"]] == [2, 2, 1]
    assert len(fake.calls) == 5


def test_empty_schedule_passes_the_conversation_straight_through(server, fake):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is six times seven?"},
    ]
    completion = client(server).chat.completions.create(
        model="scripted", messages=messages, extra_body={"pacore": {"schedule": []}}
    )
    assert len(fake.calls) == 1
    assert fake.calls[0].messages == messages
    assert completion.choices[0].message.content == "I think the answer is 40."
    assert [(r["k"], r["final"]) for r in completion.model_extra["pacore"]["rounds"]] == [(1, True)]


def test_images_reach_the_backend_in_every_round(server, fake):
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}},
    ]
    completion = client(server).chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": content}]
    )
    assert completion.choices[0].message.content == FINAL
    first_round, synthesis = fake.calls[0], fake.calls[-1]
    assert first_round.messages == [{"role": "user", "content": content}]
    assert is_synthesis(synthesis)
    assert synthesis.messages[-1]["content"][1:] == [content[1]]


def test_sampling_fields_reach_the_backend(server, fake):
    ask(
        server,
        temperature=0.3,
        top_p=0.9,
        max_completion_tokens=77,
        seed=5,
        stop=["END"],
        presence_penalty=0.5,
        extra_body={"pacore": {"schedule": []}},
    )
    params = fake.calls[0].params
    assert (params.temperature, params.top_p, params.max_tokens, params.stop) == (0.3, 0.9, 77, ("END",))
    assert params.seed is not None
    assert params.extra == {"presence_penalty": 0.5}


def test_models_lists_the_served_model_and_its_variants(server):
    ids = [m.id for m in client(server).models.list()]
    assert ids == [
        "scripted",
        "pacore-low/scripted",
        "pacore-medium/scripted",
        "pacore-high/scripted",
        "pacore-1/scripted",
    ]
    assert httpx.get(f"{server.base_url}/health").json()["status"] == "ok"


# --- errors ---------------------------------------------------------------------------


def error_body(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.fixture
def keyed_server(fake) -> Iterator[RunningServer]:
    config = ServerConfig(schedule=Schedule.parse([2]), api_keys=("key-one", "key-two"))
    with running_app(fake, config) as running:
        yield running


def test_api_keys_are_required_everywhere_but_health(keyed_server, fake):
    with pytest.raises(openai.AuthenticationError) as unknown:
        ask(keyed_server)
    assert "invalid API key" in str(unknown.value)
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(keyed_server, api_key="key-three").models.list()
    assert wrong.value.body["code"] == "invalid_api_key"
    assert fake.calls == []

    assert (
        client(keyed_server, api_key="key-two")
        .chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}])
        .choices[0]
        .message.content
        == FINAL
    )
    base = keyed_server.base_url
    assert httpx.get(f"{base}/health").status_code == 200
    for path in ("/metrics", "/ui/api/requests", "/v1/models", "/nowhere"):
        response = httpx.get(f"{base}{path}")
        assert response.status_code == 401, path
        assert error_body(response)["type"] == "authentication_error"
        assert "missing API key" in error_body(response)["message"]
        assert httpx.get(f"{base}{path}", headers={"Authorization": "Bearer key-one"}).status_code != 401


@pytest.mark.parametrize(
    ("options", "param", "words"),
    [
        ({"n": 2}, "n", "n=2 is not supported"),
        ({"model": "pacore-lots/scripted"}, "model", "is not a count"),
        ({"extra_body": {"pacore": {"schedule": [0]}}}, "pacore.schedule", "at least 1"),
        ({"model": "pacore-200/scripted"}, "model", "at most 128 per request"),
        ({"extra_body": {"pacore": {"schedule": [2, 2, 2, 2, 2]}}}, "pacore.schedule", "at most 4"),
        ({"temperature": 5}, "temperature", "less than or equal to 2"),
        ({"logprobs": True}, "logprobs", "not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ({"extra_body": {"pacore": {"reference_order": "sorted"}}}, "pacore.reference_order", "'shuffle' or 'release'"),
        ({"extra_body": {"pacore": {"reference_order": 1}}}, "pacore.reference_order", "'shuffle' or 'release'"),
    ],
)
def test_bad_requests_get_400_naming_the_field(server, fake, options, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(server, **options)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param
    assert words in caught.value.body["message"]
    assert caught.value.body["type"] == "invalid_request_error"
    assert fake.calls == []


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"model": "m", "messages": [', "not valid JSON"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "not valid UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"model": "m"}', "messages: Field required"),
        (b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}', "messages.0.role"),
        (b'{"model": "m", "messages": [{"role": "system", "content": "x"}]}', "no user message"),
        (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}', "messages.0.content"),
    ],
)
def test_malformed_bodies_get_400_in_openai_shape(server, body, words):
    response = httpx.post(
        f"{server.api_url}/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    error = error_body(response)
    assert words in error["message"]
    assert error["type"] == "invalid_request_error"


def test_routing_errors_use_the_openai_shape(server):
    missing = httpx.get(f"{server.base_url}/v1/nothing-here")
    assert missing.status_code == 404
    assert error_body(missing)["type"] == "not_found_error"
    wrong_method = httpx.get(f"{server.api_url}/chat/completions")
    assert wrong_method.status_code == 405
    assert "POST" in wrong_method.headers["allow"]
    assert error_body(wrong_method)["message"] == "Method Not Allowed"
    unknown = httpx.get(f"{server.base_url}/ui/api/requests/nope")
    assert unknown.status_code == 404
    assert "no request 'nope'" in error_body(unknown)["message"]
    bad_query = httpx.get(f"{server.base_url}/ui/api/requests/nope?since=-1")
    assert bad_query.status_code == 400
    assert error_body(bad_query)["param"] == "since"


def test_bodies_over_the_limit_get_413(fake):
    with running_app(fake, ServerConfig(schedule=Schedule.parse([2]), max_body_bytes=2000)) as running:
        with pytest.raises(openai.APIStatusError) as caught:
            client(running).chat.completions.create(
                model="scripted", messages=[{"role": "user", "content": "x" * 5000}]
            )
        assert caught.value.status_code == 413
        assert "limit of 2,000 bytes" in caught.value.body["message"]

        # Without a Content-Length the limit still holds while the body streams in.
        def chunks() -> Iterator[bytes]:
            yield b'{"model": "m", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}]}'

        response = httpx.post(f"{running.api_url}/chat/completions", content=chunks())
        assert "content-length" not in response.request.headers
        assert response.status_code == 413
        assert error_body(response)["code"] == "request_too_large"
    assert fake.calls == []


def test_requests_over_the_concurrency_limit_get_429(fake):
    fake.gate = threading.Event()  # the first request holds its slot until the second was refused
    config = ServerConfig(schedule=Schedule.parse([1]), max_concurrent_requests=1, retry_after_s=7)
    with running_app(fake, config) as running:
        first = threading.Thread(target=ask, args=(running,))
        first.start()
        wait_for(lambda: len(fake.calls) >= 1)
        with pytest.raises(openai.RateLimitError) as caught:
            ask(running)
        assert caught.value.response.headers["retry-after"] == "7"
        assert caught.value.body["type"] == "rate_limit_error"
        fake.gate.set()
        first.join()
        # The slot is free again once the first request is done.
        assert ask(running).choices[0].message.content == FINAL
        assert metric(running, "pacore_requests_total", endpoint="/v1/chat/completions", status="429") == 1


def test_a_backend_failure_is_a_5xx_and_a_stream_error_event(fake):
    fake.respond = lambda call, i: fail("auth", "HTTP 401 from backend: bad key")
    with running_app(fake, ServerConfig(schedule=Schedule.parse([2]))) as running:
        with pytest.raises(openai.InternalServerError) as caught:
            ask(running)
        assert caught.value.status_code == 502
        assert caught.value.body["code"] == "backend_auth"
        with pytest.raises(openai.APIError) as streamed:
            list(ask(running, stream=True))
        assert "HTTP 401 from backend" in str(streamed.value)
        assert metric(running, "pacore_backend_errors_total", kind="auth") == 2
        assert metric(running, "pacore_requests_total", endpoint="/v1/chat/completions", status="502") == 2


INTERNAL_ERROR = {
    "message": "internal server error; see the server log",
    "type": "api_error",
    "param": None,
    "code": None,
}


@contextlib.contextmanager
def logged_errors(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records logger ``name`` gets with a traceback attached, while in the block."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record) if record.exc_info else None  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_a_bug_is_a_500_without_details_and_its_traceback_is_logged(fake, monkeypatch):
    fake.respond = lambda call, i: RuntimeError("injected bug in the backend")
    with running_app(fake, ServerConfig(schedule=Schedule.parse([1]))) as running:
        with logged_errors("pacore.server") as engine_bugs, pytest.raises(openai.InternalServerError) as caught:
            ask(running)
        assert caught.value.status_code == 500
        assert caught.value.body == INTERNAL_ERROR
        assert [str(r.exc_info[1]) for r in engine_bugs] == ["injected bug in the backend"]

        # A bug in the route itself, after the engine answered: the same reply, logged by the HTTP server.
        fake.respond = reply

        def broken(*args, **kwargs):
            raise RuntimeError("injected bug in the route")

        monkeypatch.setattr("pacore.server.app.completion_of", broken)
        with logged_errors("uvicorn.error") as route_bugs:
            with pytest.raises(openai.InternalServerError) as caught:
                ask(running)
            # Starlette sends the 500 before the exception reaches uvicorn, which then logs it: a
            # client can read the reply first (CI did, once), so wait for the log within the block.
            wait_for(lambda: route_bugs)
        assert caught.value.body == INTERNAL_ERROR
        assert [str(r.exc_info[1]) for r in route_bugs] == ["injected bug in the route"]
        assert metric(running, "pacore_requests_total", endpoint="/v1/chat/completions", status="500") == 2
        # A client's error is not a bug: answered, not logged as one.
        with logged_errors("uvicorn.error") as none, logged_errors("pacore.server") as neither:
            assert httpx.post(f"{running.api_url}/chat/completions", content=b"{").status_code == 400
        assert none == neither == []


# --- cancellation -------------------------------------------------------------------------


def slow_first_round(call: Call) -> float:
    return 0.0 if is_synthesis(call) else 30.0


def test_closing_a_stream_cancels_the_backend_calls(fake):
    fake.delay = slow_first_round
    with running_app(fake, ServerConfig(schedule=Schedule.parse([3]))) as running:
        stream = ask(running, stream=True)
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        wait_for(lambda: len(fake.calls) == 3)
        stream.close()
        # Cancelled, not finished: only a call cut while it sleeps (30 s) is listed as cancelled.
        wait_for(lambda: len(fake.cancelled) == 3)
        server_state = running.app.state.pacore
        wait_for(lambda: server_state.running == 0)
        (record,) = server_state.history.recent()
        assert record.status == "cancelled"
        assert metric(running, "pacore_requests_in_flight") == 0
        assert metric(running, "pacore_requests_total", endpoint="/v1/chat/completions", status="499") == 1


async def test_a_client_that_gives_up_on_a_plain_request_cancels_it(fake):
    fake.delay = slow_first_round
    with running_app(fake, ServerConfig(schedule=Schedule.parse([2]))) as running:
        async with async_client(running) as sdk:
            request = asyncio.create_task(
                sdk.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}])
            )
            # It gives up once both calls run (not after a client timeout, which a loaded machine
            # could reach before the server had started them).
            await asyncio.to_thread(wait_for, lambda: len(fake.calls) == 2)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
        wait_for(lambda: len(fake.cancelled) == 2)
        assert running.app.state.pacore.history.recent()[0].status == "cancelled"


# --- metrics and the viewer's data ------------------------------------------------------


def test_metrics_move_after_requests(fake):
    def flaky(call: Call, i: int) -> str | Completion:
        if call.number == 1:
            return Completion(text="", error="read timed out", error_kind="timeout")
        return reply(call, i)

    fake.respond = flaky
    with running_app(fake, ServerConfig(schedule=Schedule.parse([3]))) as running:
        assert metric(running, "pacore_trajectories_total", outcome="ok") == 0
        completion = ask(running)
        # Read to the end: a stream closed at once may now be noticed (and cancelled, 499) before it ends.
        list(ask(running, stream=True, extra_body={"pacore": {"schedule": []}}))
        wait_for(lambda: running.app.state.pacore.running == 0)

        assert metric(running, "pacore_requests_total", endpoint="/v1/chat/completions", status="200") == 2
        assert metric(running, "pacore_trajectories_total", outcome="ok") == 3 + 1
        assert metric(running, "pacore_trajectories_total", outcome="failed") == 1
        assert metric(running, "pacore_backend_errors_total", kind="timeout") == 1
        assert metric(running, "pacore_generated_tokens_total") == completion.usage.completion_tokens + 6
        assert metric(running, "pacore_request_duration_seconds_count") == 2
        assert metric(running, "pacore_round_duration_seconds_count", final="false") == 1
        assert metric(running, "pacore_round_duration_seconds_count", final="true") == 2
        assert metric(running, "pacore_requests_in_flight") == 0
        text = httpx.get(f"{running.base_url}/metrics")
        assert text.headers["content-type"].startswith("text/plain")


def test_viewer_api_shows_rounds_answers_and_distribution(server):
    # Answers are extracted only under a grading kind (see test_viewer_api.py for requests without one).
    completion = ask(server, extra_body={"pacore": {"grading": "number"}})
    listing = httpx.get(f"{server.base_url}/ui/api/requests").json()["data"]
    assert [r["id"] for r in listing] == [completion.id]
    assert listing[0]["status"] == "done"

    detail = httpx.get(f"{server.base_url}/ui/api/requests/{completion.id}").json()
    assert detail["question"] == "What is six times seven?"
    assert detail["answer"] == FINAL
    assert detail["final_answer"] == "42"
    first, final = detail["rounds"]
    assert (first["k"], first["done"], first["finished"]) == (3, 3, True)
    assert [t["answer"] for t in first["trajectories"]] == ["40", "41", "42"]
    assert sorted((d["answer"], d["count"]) for d in first["distribution"]) == [("40", 1), ("41", 1), ("42", 1)]
    assert final["final"] and final["trajectories"][0]["message"] == FINAL

    # Polling with the last sequence number seen returns no trajectory twice.
    again = httpx.get(f"{server.base_url}/ui/api/requests/{completion.id}?since={detail['seq']}").json()
    assert all(r["trajectories"] == [] for r in again["rounds"])
    assert again["rounds"][0]["done"] == 3


def test_history_keeps_only_the_last_n_requests(fake):
    with running_app(fake, ServerConfig(schedule=Schedule.parse([1]), history=2)) as running:
        ids = [ask(running).id for _ in range(3)]
        listing = httpx.get(f"{running.base_url}/ui/api/requests").json()["data"]
        assert [r["id"] for r in listing] == ids[:0:-1]
        assert httpx.get(f"{running.base_url}/ui/api/requests/{ids[0]}").status_code == 404


def test_history_db_keeps_the_last_n_finished_requests_across_restarts(tmp_path):
    config = ServerConfig(schedule=Schedule.parse([2]), history=2, history_db=tmp_path / "history.sqlite")
    with running_app(backend(), config) as running:
        ids = [ask(running, extra_body={"pacore": {"grading": "number"}}).id for _ in range(3)]
    with running_app(backend(), config) as running:
        listing = httpx.get(f"{running.base_url}/ui/api/requests").json()["data"]
        assert [(r["id"], r["status"]) for r in listing] == [(ids[2], "done"), (ids[1], "done")]
        detail = httpx.get(f"{running.base_url}/ui/api/requests/{ids[2]}").json()
        assert detail["answer"] == FINAL and detail["final_answer"] == "42"
        assert [(r["k"], len(r["trajectories"])) for r in detail["rounds"]] == [(2, 2), (1, 1)]
        assert httpx.get(f"{running.base_url}/ui/api/requests/{ids[0]}").status_code == 404
        newest = ask(running).id
    with running_app(backend(), config) as running:
        listing = httpx.get(f"{running.base_url}/ui/api/requests").json()["data"]
        assert [r["id"] for r in listing] == [newest, ids[2]]


def test_history_db_rows_that_cannot_be_read_are_skipped(tmp_path):
    config = ServerConfig(schedule=Schedule.parse([1]), history_db=tmp_path / "history.sqlite")
    with running_app(backend(), config) as running:
        ids = [ask(running).id for _ in range(2)]
    with contextlib.closing(sqlite3.connect(config.history_db)) as db, db:
        db.execute("UPDATE requests SET detail_json = '{}' WHERE id = ?", (ids[0],))
    with running_app(backend(), config) as running:
        listing = httpx.get(f"{running.base_url}/ui/api/requests").json()["data"]
    assert [r["id"] for r in listing] == [ids[1]]


def test_serve_history_db_from_the_command_line(tmp_path):
    database = tmp_path / "history.sqlite"
    with fast_backend("--completion-tokens", 4) as upstream:
        args = ("--backend", upstream.urls[0], "--schedule", "2", "--history-db", str(database))
        with running_cli(*args) as (running, _):
            first = ask(running, model="pacore-2/fast").id
        with running_cli(*args) as (running, _):
            listing = httpx.get(f"{running.base_url}/ui/api/requests").json()["data"]
    assert [(r["id"], r["status"]) for r in listing] == [(first, "done")]


# --- synthesis prompt: reference order and bypass --------------------------------


def test_reference_order_release_sends_the_release_order():
    # Round-1 replies of distinct lengths, so the release's sort-then-Random(42) order is known.
    fake = backend(respond=lambda call, i: FINAL if is_synthesis(call) else "x" * (call.number + 1))
    with running_app(fake, ServerConfig(schedule=Schedule.parse([5]))) as running:
        ask(running, seed=42, extra_body={"pacore": {"reference_order": "release"}})
    replies = ["x" * (n + 1) for n in range(5)]
    random.Random(42).shuffle(replies)
    prompt = fake.calls[-1].last_user_text
    shown = re.findall(r"Reference \d+:\n(x+)\n", prompt)
    assert shown == replies


def test_a_round_without_messages_bypasses_the_template_and_the_viewer_says_so():
    fake = backend(respond=lambda call, i: FINAL if call.number == 3 else "<think>only thinking</think>\n")
    with running_app(fake, ServerConfig(schedule=Schedule.parse([3]))) as running:
        completion = ask(running)
        detail = httpx.get(f"{running.base_url}/ui/api/requests/{completion.id}").json()
    assert completion.choices[0].message.content == FINAL
    assert fake.calls[-1].messages == [{"role": "user", "content": "What is six times seven?"}]
    assert [r["bypassed"] for r in detail["rounds"]] == [False, True]


def test_serve_takes_a_builtin_template_and_reference_order_by_name():
    with fast_backend("--completion-tokens", 4) as upstream:
        args = (
            "--backend",
            upstream.urls[0],
            "--schedule",
            "2",
            "--template",
            "generic",
            "--reference-order",
            "release",
        )
        with running_cli(*args) as (running, _):
            completion = ask(running, model="pacore-2/fast", seed=42)
    assert completion.choices[0].message.content
    assert [r["k"] for r in completion.model_extra["pacore"]["rounds"]] == [2, 1]
