"""Hostile clients cannot stall ``pacore serve``: bounded parsing, timeouts, strict types, bounded history.

- the request parser's time is linear in the body (a hypothesis property, in
  CPU time per byte), and every field with a size is capped before the work
  it would cause, with a 400 that names the limit and echoes nothing at length;
- large hostile bodies are refused for a fraction of a second of the server's
  CPU, while ``/health`` goes on answering;
- raw sockets on loopback play slowloris (slow headers, slow body) and a
  streaming client that never reads: each is cut by its timeout (or the
  request's deadline), its slot freed, and counted in ``/metrics``;
- booleans are not numbers and strings are not booleans; a round whose calls
  all timed out is a 504; malformed HTTP gets OpenAI's JSON; static files carry
  the viewer's CSP; redirects never use the Host header;
- the viewer's history keeps requests up to a byte budget and says what it forgot.
"""

from __future__ import annotations

import contextlib
import gc
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import Call, StreamingScriptedBackend
from harness import fast_backend, process_cpu_s
from pacore.backends.base import Completion, GenerationParams
from pacore.errors import ScheduleError
from pacore.schedule import Schedule
from pacore.server import ServerConfig, transport
from pacore.server.completions import Limits, parse_body, plan_request
from pacore.server.errors import describe
from server_harness import RunningServer, running_app, running_cli
from test_server import client, error_body, metric, reply, wait_for

pytestmark = pytest.mark.http

LIMITS = Limits()
DEFAULT = Schedule.parse([2])

# --- hostile bodies -------------------------------------------------------------------------


def chat(**fields: object) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "Why?"}], **fields}


def encode(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


#: Each builds a body of about ``n`` repeated items that a naive parser would choke on.
HOSTILE: dict[str, Callable[[int], bytes]] = {
    "schedule list": lambda n: encode(chat(pacore={"schedule": [1] * n})),
    "schedule text": lambda n: encode(chat(pacore={"schedule": ",".join(["1"] * n)})),
    "model name": lambda n: encode(chat(model="pacore-" + ",".join(["1"] * n) + "/m")),
    "messages": lambda n: encode({"model": "m", "messages": [{"role": "user", "content": "a"}] * n}),
    "content parts": lambda n: encode(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * n}]}
    ),
    "numbers in an extra field": lambda n: encode(chat(user_data=[0] * n)),
    "objects in tools": lambda n: encode(chat(tools=[{}] * n)),
    "strings in stop": lambda n: encode(chat(stop=["x"] * n)),
    "nested lists": lambda n: encode(chat(extra=[[[]]] * n)),
    "escaped quotes": lambda n: encode(chat(user_data=['"\\'] * n)),
}


def parse_and_plan(body: bytes) -> tuple[int, dict | None]:
    """``(status, error)`` of the request parser and planner on ``body`` (200: accepted)."""
    try:
        plan_request(parse_body(body, "application/json", LIMITS), default=DEFAULT, params=GenerationParams(),
                     limits=LIMITS)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - every exception must be a described one
        reply_ = describe(exc)
        return reply_.status, reply_.body.error.model_dump()
    return 200, None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from(sorted(HOSTILE)), n=st.integers(min_value=1, max_value=150_000))
def test_request_parsing_takes_time_linear_in_the_body(shape, n):
    body = HOSTILE[shape](n)

    def cpu_seconds() -> float:
        started = time.thread_time()  # this thread's CPU only: not the other tests' server threads
        parse_and_plan(body)
        return time.thread_time() - started

    # No garbage collection inside the timing, as timeit does: a gc.collect() per example instead
    # costs seconds in a pytest worker's large heap.
    gc.disable()
    try:
        spent = min(cpu_seconds(), cpu_seconds())  # the better of two: noise only ever adds
    finally:
        gc.enable()
    status, error = parse_and_plan(body)
    # Linear work is well under a microsecond a byte; a quadratic parser takes seconds for 100 KB.
    assert spent <= 0.05 + 1e-6 * len(body), f"{shape} x {n}: {spent:.3f}s for {len(body):,} bytes"
    assert status in (200, 400)
    if error is not None:
        # Named, bounded, and never the input back at length.
        assert len(error["message"]) < 300 and len(error["param"] or "") <= 80, error


@pytest.mark.parametrize(
    ("shape", "n", "param", "code", "words"),
    [
        (
            "schedule list",
            20_000,
            "pacore.schedule",
            "schedule_too_large",
            "20,000 coordinated rounds; this server allows at most 4",
        ),
        ("schedule text", 20_000, "pacore.schedule", "schedule_too_large", "20,000 coordinated rounds"),
        ("model name", 1_000_000, "model", "model_too_long", "at most 256"),
        ("model name", 100, "model", "schedule_too_large", "100 coordinated rounds; this server allows at most 4"),
        ("messages", 230_000, None, "too_many_json_values", "more than 50,000 JSON values"),
        ("messages", 5_000, "messages", "too_many_messages", "5,000 messages; this server accepts at most 1,000"),
        ("content parts", 1_000, "messages.0.content", "too_many_content_parts", "at most 256"),
        ("numbers in an extra field", 1_000_000, None, "too_many_json_values", "more than 50,000 JSON values"),
        ("objects in tools", 1_000_000, None, "too_many_json_values", "more than 50,000 JSON values"),
    ],
)
def test_each_size_limit_is_named_in_a_short_400(shape, n, param, code, words):
    status, error = parse_and_plan(HOSTILE[shape](n))
    assert status == 400
    assert (error["param"], error["code"]) == (param, code)
    assert words in error["message"]
    assert len(error["message"]) < 200


def test_a_long_prompt_with_many_commas_is_not_mistaken_for_many_values():
    text = 'a, b, [c], {d}, \\"e\\", ' * 50_000  # 1.1 MB of prose, 250,000 commas and brackets
    status, error = parse_and_plan(encode(chat(messages=[{"role": "user", "content": text}])))
    assert (status, error) == (200, None)


@pytest.mark.parametrize("value", [[1] * 20_000 + ["x"], ",".join(["1"] * 20_000) + ",x", ["y" * 100_000] * 3])
def test_schedule_parsing_is_linear_and_its_errors_short(value):
    started = time.thread_time()  # this thread's CPU only: not a server thread another test left winding down
    with pytest.raises(ScheduleError) as caught:
        Schedule.parse(value)
    assert time.thread_time() - started < 0.5  # was 81 s for 20,000 entries: a string built per entry
    assert len(str(caught.value)) < 200


# --- strict types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"pacore": {"schedule": [True]}}, "pacore.schedule"),
        ({"pacore": {"schedule": True}}, "pacore.schedule"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_completion_tokens": "12"}, "max_completion_tokens"),
        ({"n": True}, "n"),
        ({"seed": 1.5}, "seed"),
        ({"temperature": True}, "temperature"),
        ({"top_p": "0.5"}, "top_p"),
        ({"logprobs": "false"}, "logprobs"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ],
)
def test_booleans_are_not_numbers_and_strings_are_not_booleans(fields, param):
    status, error = parse_and_plan(encode(chat(**fields)))
    assert status == 400 and error["param"].startswith(param), error


def test_numbers_of_the_right_kind_are_still_accepted():
    assert parse_and_plan(encode(chat(temperature=1, top_p=1, max_tokens=5, seed=3, stream=False, n=1)))[0] == 200


# --- the server, with real sockets ---------------------------------------------------------------


@pytest.fixture
def fake() -> StreamingScriptedBackend:
    return StreamingScriptedBackend(respond=reply)


def host_port(running: RunningServer) -> tuple[str, int]:
    host, port = running.base_url.removeprefix("http://").split(":")
    return host, int(port)


def read_reply(connection: socket.socket) -> tuple[int, dict, dict]:
    """``(status, headers, json body)`` of the one response the server writes, then closes."""
    response = http.client.HTTPResponse(connection)
    response.begin()
    return response.status, dict(response.getheaders()), json.loads(response.read())


def test_health_answers_fast_while_large_hostile_bodies_are_refused():
    bodies = [HOSTILE["messages"](230_000), HOSTILE["model name"](1_500_000), HOSTILE["schedule list"](20_000),
              HOSTILE["numbers in an extra field"](3_000_000)]  # fmt: skip
    refused: list[tuple[int, float]] = []
    # The real command in its own process: the server's event loop alone is timed, not this one's GIL.
    with running_cli("--backend", "http://127.0.0.1:9/v1", "--model", "m") as (running, process):

        def attack() -> None:
            with httpx.Client(base_url=running.api_url, timeout=60) as http_client:
                for body in bodies * 2:
                    started = time.monotonic()
                    response = http_client.post("/chat/completions", content=body)
                    refused.append((response.status_code, time.monotonic() - started))

        attacker = threading.Thread(target=attack)
        latencies = []
        with httpx.Client(base_url=running.base_url, timeout=10) as probe:
            probe.get("/health")  # connected, so each probe times the server alone
            cpu_before = process_cpu_s(process.pid)
            attacker.start()
            while attacker.is_alive():
                started = time.monotonic()
                assert probe.get("/health").status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.005)
            attacker.join()
            cpu_used = process_cpu_s(process.pid) - cpu_before
    assert [status for status, _ in refused] == [400] * len(bodies) * 2
    # Before the limits, one of these bodies held the event loop for seconds of CPU (81 s for the
    # schedule). Counted in the server's CPU time, which a loaded machine does not stretch as it
    # does the wall clock: the 8 refusals and the probes take about 0.2 s of it.
    assert cpu_used < 3, cpu_used
    # Wall-clock bounds a loaded 2-core machine (CI: 4 test workers) cannot reach, as a parser
    # holding the loop for a minute would: the typical probe takes milliseconds here.
    assert max(seconds for _, seconds in refused) < 30
    assert len(latencies) >= 10
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.5 and latencies[-1] < 30, latencies[-5:]


@contextlib.contextmanager
def raw_connection(running: RunningServer) -> Iterator[socket.socket]:
    with socket.create_connection(host_port(running), timeout=15) as connection:
        yield connection


#: Bytes a slowloris client sends, one every 0.2 s, until it is cut: it would go on for 60 s, and
#: half that is the bound on a cut the 1 s timeout makes (a loaded machine's stalls stay far below).
DRIBBLES = 300


@pytest.fixture(params=["httptools", "h11"])
def parser(request, monkeypatch) -> str:
    """The server's HTTP parser: httptools (installed by the server extra) or h11 (without it)."""
    if request.param == "h11":
        monkeypatch.setattr(transport, "HttpToolsProtocol", None)
    else:
        assert transport.HttpToolsProtocol is not None, "the server extra installs httptools"
    return request.param


def test_slow_headers_get_a_408_in_openai_shape_and_are_counted(fake, parser):
    with running_app(fake, ServerConfig(schedule=DEFAULT, header_timeout_s=1.0)) as running:
        with raw_connection(running) as connection:
            started = time.monotonic()
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            with contextlib.suppress(OSError):
                for _ in range(DRIBBLES):  # a header byte every 0.2 s: each keeps a keep-alive timer from firing
                    time.sleep(0.2)
                    connection.sendall(b"X")
            status, headers, body = read_reply(connection)
            assert status == 408 and headers["connection"] == "close"
            assert body["error"]["code"] == "request_timeout"
            assert "headers did not arrive within 1s" in body["error"]["message"]
            assert time.monotonic() - started < DRIBBLES * 0.2 / 2  # the bytes did not restart the clock
        # Read in this process, not with GET /metrics: under a 1 s header timeout, a loaded machine's
        # client may connect and write its GET more than 1 s later, and find the connection closed.
        registry = running.app.state.pacore.metrics.registry
        assert registry.get_sample_value("pacore_clients_cut_total", {"reason": "header_timeout"}) == 1
        # A connection that sends nothing at all is closed without a word.
        with raw_connection(running) as idle:
            assert idle.recv(100) == b""
    assert fake.calls == []


def test_a_slow_body_gets_a_408_and_frees_everything(fake):
    with running_app(fake, ServerConfig(schedule=DEFAULT, body_timeout_s=1.0)) as running:
        with raw_connection(running) as connection:
            started = time.monotonic()
            connection.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"model": '
            )
            with contextlib.suppress(OSError):
                for _ in range(DRIBBLES):
                    time.sleep(0.2)
                    connection.sendall(b" ")
            status, headers, body = read_reply(connection)
            assert status == 408 and headers["connection"] == "close"
            assert "body did not arrive within 1s" in body["error"]["message"]
            assert time.monotonic() - started < DRIBBLES * 0.2 / 2  # the bytes did not restart the clock
        assert metric(running, "pacore_clients_cut_total", reason="body_timeout") == 1
        assert metric(running, "pacore_requests_total", endpoint="/v1/chat/completions", status="408") == 1
    assert fake.calls == []


def test_slow_headers_are_cut_by_the_real_command():
    with (
        running_cli("--backend", "http://127.0.0.1:9/v1", "--model", "m", "--header-timeout", "0.5") as (running, _),
        raw_connection(running) as connection,
    ):
        connection.sendall(b"GET /health HTTP/1.1\r\n")
        status, _, body = read_reply(connection)
    assert status == 408 and body["error"]["type"] == "invalid_request_error"


#: Streamed a word per event: 120 events of 100 KB, more than loopback's socket buffers hold.
LONG_ANSWER = ("x" * 100_000 + " ") * 120


def long_answer(call: Call, i: int) -> str:
    return LONG_ANSWER


@contextlib.contextmanager
def a_stream_nobody_reads(running: RunningServer) -> Iterator[socket.socket]:
    """A streamed chat request whose client, with a tiny receive buffer, never reads a byte."""
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.connect(host_port(running))
    body = encode({"model": "pacore-1/m", "stream": True, "messages": [{"role": "user", "content": "Talk."}]})
    connection.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    try:
        yield connection
    finally:
        connection.close()


def slot_is_free(running: RunningServer) -> bool:
    return running.app.state.pacore.running == 0


@pytest.mark.parametrize(
    ("limits", "reason"),
    [({"write_timeout_s": 1.0}, "write_stall"), ({"deadline_s": 2.0, "write_timeout_s": 600.0}, "deadline")],
)
def test_a_stream_its_client_does_not_read_loses_its_slot(limits, reason, parser):
    # The whole answer is queued at once: streamed a word per loop turn, a loaded machine could reach the
    # deadline with less than the socket buffers hold, which is then written out, and nothing is cut.
    backend = StreamingScriptedBackend(respond=long_answer, interleaved=False)
    config = ServerConfig(schedule=DEFAULT, max_concurrent_requests=1, **limits)
    with running_app(backend, config) as running:
        with a_stream_nobody_reads(running):
            wait_for(lambda: len(backend.calls) == 1)
            assert not slot_is_free(running)
            # Freed within a minute: by its limit (the buffers fill, then 1 s without progress, or
            # the 2 s deadline and its write-out), not by the other one (600 s, or none at all).
            wait_for(lambda: slot_is_free(running), timeout=60)
            # The slot is someone else's now, while the reader-less connection may still be open.
            assert (
                client(running)
                .chat.completions.create(model="pacore-1/m", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
                .choices[0]
                .message.content
                == LONG_ANSWER.strip()
            )
        assert metric(running, "pacore_clients_cut_total", reason=reason) == 1


def test_a_stream_read_slowly_but_steadily_is_not_cut(parser):
    backend = StreamingScriptedBackend(respond=long_answer)
    # The reader drains the kernel's queue, not the server's own buffer, for several stall limits:
    # progress is counted in both.
    # A 2 s stall limit, 40 times the reader's pauses: only a stall of the machine longer than that
    # (this process hosts the server too) would look like a client that stopped reading.
    with running_app(backend, ServerConfig(schedule=DEFAULT, write_timeout_s=2.0)) as running:
        with a_stream_nobody_reads(running) as connection:
            wait_for(lambda: len(backend.calls) == 1)
            received = bytearray()
            started = time.monotonic()
            while chunk := connection.recv(8192):
                received += chunk
                if time.monotonic() - started < 6.0:
                    time.sleep(0.05)  # 160 KB/s, far slower than the server writes: its buffer stays full
        assert b"data: [DONE]" in received[-100:], bytes(received[-100:])
        assert len(received) > len(LONG_ANSWER)
        assert metric(running, "pacore_clients_cut_total", reason="write_stall") == 0


# --- contract ------------------------------------------------------------------------------------


def test_a_round_whose_calls_all_timed_out_is_a_504(fake):
    fake.respond = lambda call, i: Completion(text="", error="no answer within 1s", error_kind="timeout")
    # The SDK client closed by the block: a failed call's traceback would keep it for the GC, which can
    # find its socket still open (a ResourceWarning).
    with running_app(fake, ServerConfig(schedule=DEFAULT)) as running, client(running) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
        assert caught.value.status_code == 504
        assert caught.value.body["code"] == "backend_timeout"
        with pytest.raises(openai.APIError) as streamed:
            list(sdk.chat.completions.create(
                model="m", stream=True, messages=[{"role": "user", "content": "Hi"}]
            ))  # fmt: skip
        assert streamed.value.body["code"] == "backend_timeout"
        # Failures of mixed kinds remain the upstream's fault: 502.
        fake.respond = lambda call, i: Completion(
            text="", error="boom", error_kind="timeout" if call.number % 2 else "status"
        )
        with pytest.raises(openai.InternalServerError) as mixed:
            sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
        assert (mixed.value.status_code, mixed.value.body["code"]) == (502, "round_failed")


def test_strict_types_through_the_sdk(fake):
    with running_app(fake, ServerConfig(schedule=DEFAULT)) as running, client(running) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hi"}], extra_body={"pacore": {"schedule": [True]}}
            )
        assert caught.value.body["param"].startswith("pacore.schedule")
    assert fake.calls == []


def test_malformed_http_gets_a_json_400(fake, parser):
    with running_app(fake, ServerConfig(schedule=DEFAULT)) as running:
        for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
            with raw_connection(running) as connection:
                connection.sendall(garbage)
                status, headers, body = read_reply(connection)
            assert status == 400 and headers["content-type"] == "application/json"
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["code"] == "malformed_http"


def test_headers_beyond_the_limit_get_a_json_431_and_are_counted(fake, parser):
    with running_app(fake, ServerConfig(schedule=DEFAULT)) as running:
        with raw_connection(running) as connection:
            with contextlib.suppress(OSError):  # the server may close before the last bytes are in
                connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                for _ in range(transport.MAX_HEAD_BYTES // 1000 + 1):
                    connection.sendall(b"X-Filler: " + b"y" * 988 + b"\r\n")
            status, headers, body = read_reply(connection)
        assert status == 431 and headers["connection"] == "close"
        assert body["error"]["code"] == "headers_too_large"
        assert f"exceed {transport.MAX_HEAD_BYTES:,} bytes" in body["error"]["message"]
        assert metric(running, "pacore_clients_cut_total", reason="headers_too_large") == 1
        # Headers just within the limit are served.
        with raw_connection(running) as connection:
            filler = b"".join(b"X-Filler: " + b"y" * 988 + b"\r\n" for _ in range(transport.MAX_HEAD_BYTES // 1000 - 1))
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + filler + b"\r\n")
            status, _, body = read_reply(connection)
        assert status == 200 and body["status"] == "ok"
    assert fake.calls == []


def test_every_static_file_of_the_viewer_has_the_csp(fake):
    with running_app(fake, ServerConfig(schedule=DEFAULT)) as running:
        for path in ("/ui", "/ui/", "/ui/static/viewer.js", "/ui/static/viewer.css", "/ui/static/index.html"):
            response = httpx.get(f"{running.base_url}{path}")
            assert response.status_code == 200, path
            assert "default-src 'self'" in response.headers["content-security-policy"], path


def test_trailing_slash_redirects_never_use_the_host_header(fake):
    with running_app(fake, ServerConfig(schedule=DEFAULT)) as running:
        response = httpx.get(f"{running.base_url}/v1/models/?x=1", headers={"Host": "evil.example"})
        assert response.status_code == 307
        assert response.headers["location"] == "/v1/models?x=1"
        missing = httpx.get(f"{running.base_url}/v1/nothing/", headers={"Host": "evil.example"})
        assert missing.status_code == 404 and "evil" not in missing.text
        assert error_body(missing)["type"] == "not_found_error"


# --- the history's byte budget ----------------------------------------------------------------------


def test_the_history_keeps_requests_up_to_its_byte_budget_and_says_what_it_dropped(fake):
    big = "x" * 100_000
    fake.respond = lambda call, i: f"{big} the answer is 42."
    # Each request keeps about 3 x 100 KB (two trajectories' messages and the answer): 2 fit in 700 KB.
    config = ServerConfig(schedule=Schedule.parse([1]), history=100, history_bytes=700_000)
    with running_app(fake, config) as running:
        ids = [client(running).chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"Q{i}"}]).id for i in range(5)]  # fmt: skip
        listing = httpx.get(f"{running.base_url}/ui/api/requests").json()
        assert [r["id"] for r in listing["data"]] == ids[:2:-1]
        assert listing["dropped"] == 3
        assert 0 < listing["bytes"] <= listing["max_bytes"] == 700_000
        assert metric(running, "pacore_history_dropped_total") == 3
        assert httpx.get(f"{running.base_url}/ui/api/requests/{ids[0]}").status_code == 404


def test_a_running_request_is_never_forgotten_for_its_size(fake):
    fake.respond = lambda call, i: "y" * 50_000
    fake.delay = lambda call: 0.0 if call.number == 0 else 30.0
    config = ServerConfig(schedule=Schedule.parse([2]), history_bytes=1)
    with running_app(fake, config) as running:
        stream = client(running).chat.completions.create(
            model="m", stream=True, messages=[{"role": "user", "content": "Hi"}]
        )
        next(iter(stream))
        wait_for(lambda: len(fake.calls) == 2)
        listing = httpx.get(f"{running.base_url}/ui/api/requests").json()
        assert [r["status"] for r in listing["data"]] == ["running"] and listing["dropped"] == 0
        stream.close()


def test_history_bytes_from_the_command_line():
    with (
        fast_backend("--completion-tokens", 4) as upstream,
        running_cli("--backend", upstream.urls[0], "--history-bytes", "1000") as (running, _),
    ):
        for _ in range(2):
            client(running).chat.completions.create(model="pacore-2/fast", messages=[{"role": "user", "content": "Hi"}])
        listing = httpx.get(f"{running.base_url}/ui/api/requests").json()
    # Every finished request holds more than 1,000 bytes: none is kept, and the listing says so.
    assert (listing["data"], listing["dropped"], listing["max_bytes"]) == ([], 2, 1000)
