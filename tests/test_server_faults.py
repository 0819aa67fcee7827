"""The server under load against a backend that fails in every way it can.

Hundreds of concurrent clients on loopback, each asking a question that
names the fault its backend calls will meet: every reply must be a
success, a 429 by design, or an error in OpenAI's shape with the status and
code that fault deserves; never a raw 500, never a cut connection. Memory
and the viewer's history stay bounded across repeated bursts. The long
soak variant belongs in bench/, not here.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import httpx
import openai
import pytest

from fakes import Call, StreamingScriptedBackend
from pacore.backends.base import Completion, DeltaCallback, GenerationParams, Message, text_of
from pacore.backends.openai_http import OpenAIBackend
from pacore.errors import BackendError
from pacore.schedule import Schedule
from pacore.server import ServerConfig
from pacore.server.history import RequestRecord
from server_harness import RunningServer, running_app
from test_server import metric, wait_for

pytestmark = pytest.mark.http

# Far above the slow fault's sleeps (2 rounds of at most 0.5 s): only a hang may reach it, even on a loaded machine.
DEADLINE_S = 5.0
CONCURRENCY = 40
HISTORY = 50
ANSWER = "Weighing the references, the answer is 42."

#: fault -> (HTTP status of a plain request, error code) when it fails; None: it succeeds.
EXPECTED: dict[str, tuple[int, str | None] | None] = {
    "ok": None,
    "slow": None,
    "flaky": None,  # half the round-1 samples fail, synthesis still has references
    "status": (502, "round_failed"),  # transient kinds are recorded per trajectory...
    "timeout": (504, "backend_timeout"),  # every call of the round timed out: 504, as documented
    "connect": (502, "round_failed"),
    "protocol": (502, "round_failed"),
    "auth": (502, "backend_auth"),  # ...fatal ones stop the request at once
    "not_found": (502, "backend_not_found"),
    "bad_request": (400, "backend_bad_request"),
    "model": (500, "backend_model"),
    "crash": (500, None),  # a bug in a backend: "internal server error", no details
    "midstream": (502, "round_failed"),  # the answer's stream breaks after a few words
    "crash_midstream": (500, None),
    "hang": (504, "deadline_exceeded"),
}
FAULTS = list(EXPECTED)
BACKEND_KINDS = {"status", "timeout", "connect", "protocol", "auth", "not_found", "bad_request", "model"}
#: Faults of the streamed final call only; a plain request never streams, so it succeeds.
MID_STREAM = {"midstream", "crash_midstream"}


def fault_of(messages: Sequence[Message]) -> str:
    text = text_of([m for m in messages if m["role"] == "user"][-1]["content"])
    return re.search(r"fault:(\w+)", text).group(1)  # the synthesis prompt quotes the problem


def reply(call: Call, i: int) -> str | Completion | BaseException:
    fault = fault_of(call.messages)
    synthesis = "Reference Responses" in call.last_user_text
    if fault in BACKEND_KINDS and not synthesis:
        return BackendError(f"injected {fault} failure", kind=fault)  # type: ignore[arg-type]
    if fault == "crash":
        return RuntimeError("injected bug in the backend")
    # Clients send a seed, so the calls of a round have consecutive seeds: one of two fails.
    if fault == "flaky" and call.params.seed % 2 == 0 and not synthesis:
        return Completion(text="", error="injected sample failure", error_kind="status")
    return ANSWER if synthesis else f"fault:{fault} sample {i}: the answer is 42."


def delay(call: Call) -> float:
    fault = fault_of(call.messages)
    return {"slow": random.uniform(0.1, 0.5), "hang": 3600.0}.get(fault, 0.0)


class FaultyBackend(StreamingScriptedBackend):
    """Streams the final answer, or breaks its stream part way when the question says so."""

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams, on_delta: DeltaCallback
    ) -> Completion:
        fault = fault_of(messages)
        if fault not in MID_STREAM:
            return await super().stream(messages, params, on_delta)
        for word in ANSWER.split()[:3]:
            on_delta(word + " ", "")
            await asyncio.sleep(0.01)
        if fault == "midstream":
            raise BackendError("the connection broke mid-stream", kind="connect")
        raise RuntimeError("injected bug mid-stream")


@dataclass
class Outcome:
    fault: str
    stream: bool
    status: int
    #: The error's code (None: success); "gave up" for a client that left on purpose.
    code: str | None = None
    error: dict | None = None
    content: str = ""
    retries: int = 0


@pytest.fixture(scope="module")
def faulty() -> Iterator[tuple[RunningServer, FaultyBackend]]:
    backend = FaultyBackend(respond=reply, delay=delay)
    # This process runs the server and up to 200 clients on one GIL: on a loaded machine a client may
    # connect, then write its request more than the default 10 s later. The server has closed that
    # silent connection by then (as keep-alive would), and the request meets a reset (httpx.ReadError).
    # The header timeout has its own tests (test_server_limits.py); here it only waits for the clients.
    config = ServerConfig(
        schedule=Schedule.parse([2]), max_concurrent_requests=CONCURRENCY, history=HISTORY,
        deadline_s=DEADLINE_S, retry_after_s=1, header_timeout_s=120.0,
    )  # fmt: skip
    with running_app(backend, config) as running:
        yield running, backend


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def asgi_errors() -> Iterator[list[str]]:
    """What uvicorn logs when an exception escapes the app (its logger does not propagate to the root)."""
    handler = Collect()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def error_of(body: dict) -> dict:
    """The ``error`` object of an OpenAI error body, checked for its exact shape."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"] and "injected bug" not in error["message"]
    return error


async def ask(client: httpx.AsyncClient, fault: str, stream: bool) -> Outcome:
    """One client: retries a 429 as its Retry-After says (shortened), reads the whole reply."""
    body = {"model": "scripted", "seed": 7, "messages": [{"role": "user", "content": f"fault:{fault} What is 6 x 7?"}]}
    for retries in range(200):
        async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": stream}) as response:
            if response.status_code == 429:
                assert response.headers["retry-after"] == "1"
                assert error_of(json.loads(await response.aread()))["type"] == "rate_limit_error"
                await asyncio.sleep(random.uniform(0.05, 0.3))
                continue
            outcome = Outcome(fault, stream, response.status_code, retries=retries)
            if response.status_code != 200:
                outcome.error = error_of(json.loads(await response.aread()))
                outcome.code = outcome.error["code"]
                return outcome
            if not stream:
                outcome.content = json.loads(await response.aread())["choices"][0]["message"]["content"]
                return outcome
            assert response.headers["content-type"].startswith("text/event-stream")
            return await read_events(response, outcome)
    raise AssertionError(f"fault:{fault}: still refused with 429 after 200 tries")


async def read_events(response: httpx.Response, outcome: Outcome) -> Outcome:
    """Every event is a chunk until the last: ``[DONE]`` or an OpenAI error object."""
    events = [line[len("data: ") :] async for line in response.aiter_lines() if line.startswith("data: ")]
    last = events[-1]
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    outcome.content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    if last != "[DONE]":
        outcome.error = error_of(json.loads(last))
        outcome.code = outcome.error["code"]
    return outcome


async def give_up_early(client: httpx.AsyncClient) -> Outcome:
    """A client that reads the first event of a slow stream, then hangs up."""
    body = {"model": "scripted", "stream": True, "messages": [{"role": "user", "content": "fault:hang Why?"}]}
    for retries in range(200):
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code == 429:
                await asyncio.sleep(random.uniform(0.05, 0.3))
                continue
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break
            return Outcome("hang", True, response.status_code, code="gave up", retries=retries)
    raise AssertionError("still refused with 429 after 200 tries")


async def burst(running: RunningServer, clients: int, seed: int) -> list[Outcome]:
    """``clients`` concurrent requests, faults and stream/plain mixed, a few hanging up early."""
    rng = random.Random(seed)
    # No keep-alive: reusing a connection just as the server closes it for idleness fails in any
    # HTTP client (and clients retry it); the server's own failures are what is checked here.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=running.base_url, limits=limits, timeout=30) as client:
        jobs = [
            give_up_early(client) if i % 25 == 0 else ask(client, FAULTS[i % len(FAULTS)], stream=rng.random() < 0.75)
            for i in range(clients)
        ]
        rng.shuffle(jobs)
        return await asyncio.gather(*jobs)


def check(outcomes: list[Outcome]) -> None:
    """Each outcome is exactly what its fault deserves."""
    for outcome in outcomes:
        if outcome.code == "gave up":
            assert outcome.status == 200
            continue
        expected = EXPECTED[outcome.fault] if outcome.stream or outcome.fault not in MID_STREAM else None
        if expected is None:
            assert (outcome.status, outcome.code) == (200, None), outcome
            assert outcome.content == ANSWER, outcome
            continue
        status, code = expected
        # Once a stream has started, its status is 200 and the error comes as its last event.
        assert outcome.status == (200 if outcome.stream else status), outcome
        assert outcome.code == code, outcome
        assert outcome.error["type"] == ("invalid_request_error" if status == 400 else "api_error"), outcome
        if outcome.fault == "midstream" and outcome.stream:
            # The words that did arrive are not taken back.
            assert outcome.content == "Weighing the references, ", outcome


def settled(running: RunningServer, backend: FaultyBackend) -> None:
    """Nothing left running: no request slot, no engine task, no backend call."""
    server = running.app.state.pacore
    wait_for(lambda: server.running == 0)
    hung = [call for call in backend.calls if fault_of(call.messages) == "hang"]
    wait_for(lambda: len(backend.cancelled) == len(hung))
    assert metric(running, "pacore_requests_in_flight") == 0


async def test_200_concurrent_clients_get_only_answers_429s_or_openai_errors(faulty, asgi_errors):
    running, backend = faulty
    outcomes = await burst(running, clients=200, seed=1)

    check(outcomes)
    assert len(outcomes) == 200
    assert {o.fault for o in outcomes} == set(FAULTS)
    assert sum(o.stream for o in outcomes) > 100
    # The concurrency limit really refused some, and they got through when they retried.
    assert sum(o.retries for o in outcomes) > 0
    assert sum(1 for o in outcomes if o.code == "gave up") == 8
    await asyncio.to_thread(settled, running, backend)
    refused = await asyncio.to_thread(
        metric, running, "pacore_requests_total", endpoint="/v1/chat/completions", status="429"
    )
    assert refused == sum(o.retries for o in outcomes)
    assert asgi_errors == []


@pytest.mark.slow
async def test_memory_and_history_stay_bounded_over_repeated_bursts(faulty, monkeypatch):
    running, backend = faulty
    # pytest keeps every log record, and a logged traceback keeps its request alive.
    monkeypatch.setattr(logging.getLogger("pacore.server"), "propagate", False)
    server = running.app.state.pacore
    # Other tests' servers in this process may still hold records; count only new ones
    # (the list keeps the old ones alive, so their ids cannot be reused).
    earlier = [o for o in gc.get_objects() if isinstance(o, RequestRecord)]
    earlier_ids = {id(o) for o in earlier}
    sizes = []
    for seed in range(3):
        check(await burst(running, clients=100, seed=100 + seed))
        await asyncio.to_thread(settled, running, backend)
        # The server's own figure, as an operator would scrape it (this process: the server runs in a thread).
        sizes.append(await asyncio.to_thread(metric, running, "process_resident_memory_bytes"))
        assert len(server.history.recent()) == HISTORY

    # The first burst warms caches and pools; after it, bursts add (almost) nothing.
    growth = max(sizes[1:]) - sizes[1]
    assert growth < 20 * 2**20, [f"{s / 2**20:.1f} MiB" for s in sizes]
    # Precisely: no request object outlives its request, except the history's records.
    gc.collect()
    live = Counter(type(o).__qualname__ for o in gc.get_objects() if type(o).__module__ == "pacore.server.app")
    live.update(
        type(o).__qualname__ for o in gc.get_objects() if isinstance(o, RequestRecord) and id(o) not in earlier_ids
    )
    assert live["_ChatRun"] == 0
    assert live["RequestRecord"] == HISTORY
    statuses = Counter(record.status for record in server.history.recent())
    assert set(statuses) <= {"done", "failed", "cancelled"}


async def test_the_openai_sdk_sees_answers_and_api_errors_never_a_broken_connection(faulty):
    running, _ = faulty
    # No retries: the SDK would retry a broken connection and hide it.
    async with openai.AsyncOpenAI(base_url=running.api_url, api_key="unused", max_retries=0) as client:

        async def one(fault: str) -> str | openai.APIError:
            try:
                stream = await client.chat.completions.create(
                    model="scripted",
                    stream=True,
                    seed=7,
                    messages=[{"role": "user", "content": f"fault:{fault} Why?"}],
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            except openai.APIError as exc:
                return exc

        outcomes = await asyncio.gather(*(one(FAULTS[i % len(FAULTS)]) for i in range(60)))

    for i, outcome in enumerate(outcomes):
        fault = FAULTS[i % len(FAULTS)]
        if isinstance(outcome, openai.RateLimitError):
            continue  # by design: more clients than the server's concurrency limit
        if EXPECTED[fault] is None:
            assert outcome == ANSWER, (fault, outcome)
        else:
            assert isinstance(outcome, openai.APIError) and not isinstance(outcome, openai.APIConnectionError)
            assert outcome.body["code"] == EXPECTED[fault][1], (fault, outcome.body)


async def test_backend_calls_cancelled_mid_flight_leave_the_http_backend_usable():
    upstream = StreamingScriptedBackend(delay=0.001)
    passthrough = ServerConfig(schedule=Schedule(()), max_concurrent_requests=1000, history=0)
    with running_app(upstream, passthrough) as server:
        backend = OpenAIBackend(server.api_url, model="scripted", max_connections=4)
        messages = [{"role": "user", "content": "Why?"}]
        rng = random.Random(0)
        try:
            for _ in range(300):
                # What the server does when clients hang up: cancel calls at any point of their life.
                calls = [asyncio.create_task(backend.generate(messages, 1, GenerationParams())) for _ in range(8)]
                await asyncio.sleep(rng.uniform(0, 0.004))
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
                healthy = asyncio.gather(*(backend.generate(messages, 1, GenerationParams()) for _ in range(4)))
                answers = await asyncio.wait_for(healthy, timeout=30)  # a broken pool would hang for ever
                assert all(a.ok for (a,) in answers)
        finally:
            await backend.aclose()


class SlowToStopBackend(StreamingScriptedBackend):
    """Its calls hang; cancelled, they stop only once the server has freed the request's slot
    (the engine's teardown outlasts the stream's write-out grace, as on a loaded machine)."""

    #: How many requests the server is answering (set once it runs).
    requests_running: Callable[[], int]

    async def generate(self, messages, n, params, on_progress=None, on_confidence=None):
        self.calls.append(Call(list(messages), n, params, len(self.calls)))
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.append(self.calls[-1])
            for _ in range(3000):  # at most 30 s
                if not self.requests_running():
                    break
                await asyncio.sleep(0.01)
            raise
        raise AssertionError("unreachable: the call hangs until cancelled")


async def test_a_stream_whose_engine_overruns_its_deadline_ends_with_deadline_exceeded():
    """The engine stops at the deadline; when stopping takes longer than the stream's write-out
    grace (CI once saw it under load), the server frees the slot and the client still hears of
    the deadline, never of a shutdown that is not happening."""
    backend = SlowToStopBackend()
    with running_app(backend, ServerConfig(schedule=Schedule.parse([2]), deadline_s=0.5)) as running:
        backend.requests_running = lambda: running.app.state.pacore.running
        async with httpx.AsyncClient(base_url=running.base_url, timeout=60) as http_client:
            outcome = await ask(http_client, "hang", stream=True)
        # The engine took the deadline (it cancelled the calls), and the slot was freed before it stopped.
        assert backend.cancelled and len(backend.cancelled) == len(backend.calls)
        assert (outcome.status, outcome.code) == (200, "deadline_exceeded"), outcome
        assert "deadline of 0.5s exceeded" in outcome.error["message"]
        assert await asyncio.to_thread(metric, running, "pacore_clients_cut_total", reason="deadline") == 1
        record = running.app.state.pacore.history.recent()[0]
        assert (record.status, record.error) == ("failed", outcome.error["message"])
