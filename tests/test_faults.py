"""Fault injection: ``bench/fastbackend.py --faults`` produces each fault as specified,
and pacore's real HTTP backend records each one in the trace with its kind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from faults import KINDS, FaultPlan, FaultSpecError, parse_spec
from harness import FastBackend, fast_backend
from pacore import GenerationParams, asolve
from pacore.backends.base import RetryPolicy
from pacore.backends.openai_http import OpenAIBackend
from pacore.errors import BackendError, RoundFailedError

PARAMS = GenerationParams(max_tokens=8)
WORDS = 8  # the fast backend's completions: 8 words, one token each
# One attempt per call, so each call meets exactly one fault.
ONE_ATTEMPT = RetryPolicy(max_attempts=1)
#: Silence after which pacore's backend cuts a call that meets a hang (the server never answers). It
#: bounds the connect too: at 0.3 s a loaded CI machine once took longer to connect ("connect", not "timeout").
HANG_TIMEOUT_S = 2.0
#: The same for every other kind: each answers (or breaks) at once, but a loaded machine may take
#: a second or more to do so, and a call cut by its timeout is recorded as "timeout" instead.
CALL_TIMEOUT_S = 30.0

# --- the spec --------------------------------------------------------------------


def test_spec_names_kinds_and_rates() -> None:
    assert parse_spec("500:0.05, 429:0.1,hang:0.02") == {"500": 0.05, "429": 0.1, "hang": 0.02}
    assert parse_spec("") == {}
    spread = parse_spec("all:0.24")
    assert set(spread) == set(KINDS) and all(rate == pytest.approx(0.02) for rate in spread.values())
    assert parse_spec("all:0.12,503:0.1")["503"] == pytest.approx(0.11)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("teapot:0.1", "unknown fault kind 'teapot'"),
        ("500", "expected KIND:RATE"),
        ("500:lots", "expected KIND:RATE"),
        ("500:1.5", "between 0 and 1"),
        ("500:0.6,503:0.6", "add up to 1.2"),
    ],
)
def test_bad_specs_say_why(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError, match=message):
        parse_spec(spec)


@given(st.dictionaries(st.sampled_from([*KINDS, "all"]), st.floats(0, 1), max_size=6))
def test_any_spec_parses_to_known_kinds_with_at_most_certainty(rates: dict[str, float]) -> None:
    text = ",".join(f"{kind}:{rate!r}" for kind, rate in rates.items())
    try:
        parsed = parse_spec(text)
    except FaultSpecError:
        assert sum(rates.values()) > 1
        return
    assert set(parsed) <= set(KINDS) and sum(parsed.values()) <= 1 + 1e-9


def test_draws_are_deterministic_by_seed_and_follow_the_rates() -> None:
    rates = parse_spec("500:0.1,hang:0.05,all:0.12")
    first, again, other = (FaultPlan(rates, seed) for seed in (7, 7, 8))
    sequence = [first.draw() for _ in range(20_000)]
    assert sequence == [again.draw() for _ in range(20_000)]
    assert sequence != [other.draw() for _ in range(20_000)]
    assert [FaultPlan(rates, 7, endpoint=1).draw() for _ in range(200)] != sequence[:200]
    for kind, rate in rates.items():
        assert first.injected[kind] == sequence.count(kind)
        assert abs(sequence.count(kind) / len(sequence) - rate) < 0.01, kind
    assert sequence.count(None) / len(sequence) == pytest.approx(1 - sum(rates.values()), abs=0.015)


# --- on the wire -------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, FastBackend]]:
    """One fast backend per fault kind, every chat call meeting that fault."""
    with contextlib.ExitStack() as stack:
        yield {
            kind: stack.enter_context(
                fast_backend("--faults", f"{kind}:1", "--completion-tokens", WORDS, "--fault-retry-after", 0.05)
            )
            for kind in KINDS
        }


def exchange(url: str, stream: bool = False, wait_s: float = CALL_TIMEOUT_S) -> tuple[bytes, str]:
    """Send one chat request on a fresh connection; what came back, and how the connection ended
    ("open": still open after ``wait_s`` of silence)."""
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    body = json.dumps({"model": "fast", "messages": [{"role": "user", "content": "hi"}], "stream": stream}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    received = b""
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            return received, "reset"
        except TimeoutError:
            return received, "open"
    return received, "closed"


def split(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def events(body: bytes) -> list[str]:
    """The ``data`` fields of a chunked server-sent event stream."""
    return [line.removeprefix("data: ") for line in body.decode().splitlines() if line.startswith("data: ")]


@pytest.mark.http
@pytest.mark.parametrize("kind", ["500", "502", "503", "429"])
def test_status_faults_answer_an_openai_error(servers: dict[str, FastBackend], kind: str) -> None:
    reply, ended = exchange(servers[kind].url)
    status, headers, body = split(reply)
    assert (status, ended) == (int(kind), "closed")
    assert json.loads(body)["error"]["message"] == f"injected fault: HTTP {kind}"
    assert headers.get("retry-after") == ("0.05" if kind == "429" else None)


@pytest.mark.http
def test_connection_faults(servers: dict[str, FastBackend]) -> None:
    assert exchange(servers["hang"].url, wait_s=0.5) == (b"", "open")  # still nothing after 0.5 s
    assert exchange(servers["reset"].url) == (b"", "reset")
    assert exchange(servers["down"].url) == (b"", "closed")
    for stream in (False, True):
        reply, ended = exchange(servers["reset_mid"].url, stream=stream)
        status, headers, body = split(reply)
        assert (status, ended) == (200, "reset") and body
        if not stream:
            assert 0 < len(body) < int(headers["content-length"])


@pytest.mark.http
def test_answer_faults_without_streaming(servers: dict[str, FastBackend]) -> None:
    status, headers, body = split(exchange(servers["malformed"].url)[0])
    assert status == 200 and len(body) == int(headers["content-length"])
    with pytest.raises(ValueError):
        json.loads(body)

    reply, ended = exchange(servers["truncated"].url)
    status, headers, body = split(reply)
    assert (status, ended) == (200, "closed") and 0 < len(body) < int(headers["content-length"])

    no_choices = json.loads(split(exchange(servers["no_choices"].url)[0])[2])
    assert "choices" not in no_choices and no_choices["usage"]["completion_tokens"] == WORDS
    no_usage = json.loads(split(exchange(servers["no_usage"].url)[0])[2])
    assert "usage" not in no_usage and len(no_usage["choices"][0]["message"]["content"].split()) == WORDS


@pytest.mark.http
def test_answer_faults_in_streams(servers: dict[str, FastBackend]) -> None:
    truncated = events(split(exchange(servers["truncated"].url, stream=True)[0])[2])
    assert truncated and "[DONE]" not in truncated
    assert all(json.loads(data)["choices"][0]["finish_reason"] is None for data in truncated)

    malformed = events(split(exchange(servers["malformed"].url, stream=True)[0])[2])
    with pytest.raises(ValueError):
        json.loads(malformed[-1])

    no_choices = events(split(exchange(servers["no_choices"].url, stream=True)[0])[2])
    assert no_choices[-1] == "[DONE]" and all("choices" not in json.loads(d) for d in no_choices[:-1])

    whole = events(split(exchange(servers["no_usage"].url, stream=True)[0])[2])
    chunks = [json.loads(data) for data in whole[:-1]]
    assert whole[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any("usage" in chunk for chunk in chunks)


@pytest.mark.http
def test_faults_are_counted_in_the_stats(servers: dict[str, FastBackend]) -> None:
    before = servers["503"].stats()[0]["faults"].get("503", 0)
    exchange(servers["503"].url)
    stats = servers["503"].stats()[0]
    assert stats["faults"] == {"503": before + 1} and stats["calls"] == 0


# --- through pacore's HTTP backend: every failed call is in the trace with its kind ------

#: The kind each fault is recorded with when the server answers plain JSON (it ignores
#: ``stream``), then when it streams (the default); None: the call succeeds.
RECORDED = {
    "500": ("status", "status"),
    "502": ("status", "status"),
    "503": ("status", "status"),
    "429": ("status", "status"),
    "hang": ("timeout", "timeout"),
    "reset": ("connect", "connect"),
    "reset_mid": ("connect", "protocol"),
    "malformed": ("protocol", "protocol"),
    "truncated": ("connect", "protocol"),
    "no_choices": ("protocol", "protocol"),
    "no_usage": (None, None),
    "down": ("connect", "connect"),
}


@pytest.fixture(scope="module")
def plain_servers() -> Iterator[dict[str, FastBackend]]:
    """As ``servers``, but answering plain JSON even when asked to stream."""
    with contextlib.ExitStack() as stack:
        yield {
            kind: stack.enter_context(
                fast_backend("--faults", f"{kind}:1", "--completion-tokens", WORDS, "--fault-retry-after", 0.05,
                             "--stream-support", "ignore")
            )
            for kind in KINDS
        }  # fmt: skip


def backend_for(
    server: FastBackend, retry: RetryPolicy = ONE_ATTEMPT, timeout: float = CALL_TIMEOUT_S
) -> OpenAIBackend:
    return OpenAIBackend(server.url, model="fast", n_mode="off", timeout=timeout, retry=retry)


def timeout_for(kind: str) -> float:
    return HANG_TIMEOUT_S if kind == "hang" else CALL_TIMEOUT_S


async def solve_through(server: FastBackend, timeout: float) -> list:
    """The first round's trajectories of a solve with schedule [2], whether or not it failed."""
    async with backend_for(server, timeout=timeout) as backend:
        try:
            result = await asolve("q", schedule=[2], backend=backend, params=PARAMS)
        except RoundFailedError as exc:
            assert exc.result is not None
            result = exc.result
    return result.rounds[0].trajectories


async def stream_through(server: FastBackend, timeout: float) -> str | int:
    """The final-answer stream's outcome: its tokens, or the kind it failed with."""
    async with backend_for(server, timeout=timeout) as backend:
        try:
            completion = await backend.stream([{"role": "user", "content": "q"}], PARAMS, lambda c, r: None)
        except BackendError as exc:
            return exc.kind
    return completion.completion_tokens if completion.ok else completion.error_kind


def check_recorded(kind: str, trajectories: list, expected: str | None) -> None:
    assert len(trajectories) == 2
    if expected is None:
        assert all(t.ok and t.text.split() == ["the", "answer", "is", "so", "we", "check", "each", "case"]
                   for t in trajectories)  # fmt: skip
        # No usage reported: the tokens are estimated or counted, not taken as 0.
        assert all(6 <= t.completion_tokens <= 10 for t in trajectories)
        return
    assert [t.error_kind for t in trajectories] == [expected, expected], (kind, trajectories)
    assert all(t.error and not t.ok and t.message is None for t in trajectories)
    if kind[0].isdigit():
        assert all(f"HTTP {kind}" in t.error for t in trajectories)


@pytest.mark.http
async def test_every_fault_kind_is_recorded_in_the_trace_with_its_kind(
    servers: dict[str, FastBackend], plain_servers: dict[str, FastBackend]
) -> None:
    kinds = list(RECORDED)
    plain = await asyncio.gather(*(solve_through(plain_servers[kind], timeout_for(kind)) for kind in kinds))
    streamed = await asyncio.gather(*(solve_through(servers[kind], timeout_for(kind)) for kind in kinds))
    answers = await asyncio.gather(*(stream_through(servers[kind], timeout_for(kind)) for kind in kinds))
    for kind, plain_trajectories, streamed_trajectories, answer in zip(kinds, plain, streamed, answers, strict=True):
        in_plain, in_stream = RECORDED[kind]
        check_recorded(kind, plain_trajectories, in_plain)
        check_recorded(kind, streamed_trajectories, in_stream)
        # The final answer's stream: a stream without usage counts its chunks.
        assert answer == (WORDS if in_stream is None else in_stream), (kind, answer)


@pytest.mark.http
async def test_retried_failures_are_listed_on_the_trajectory_that_finally_succeeded() -> None:
    retry = RetryPolicy(max_attempts=8, backoff_base=0.001, backoff_max=0.01, budget_min=100)
    with fast_backend("--faults", "503:0.3,429:0.2", "--fault-seed", 5, "--fault-retry-after", 0) as server:
        async with backend_for(server, retry) as backend:
            result = await asolve("q", schedule=[12], backend=backend, params=PARAMS)
        injected = server.stats()[0]["faults"]
    recorded = [label for rnd in result.rounds for t in rnd.trajectories for label in t.failed_attempts]
    assert result.usage.failed_calls == 0 and sum(injected.values()) > 3
    # Every fault the server injected is in the trace, by kind and status.
    assert sorted(recorded) == sorted(f"status {kind}" for kind, count in injected.items() for _ in range(count))
    # Round-tripped through JSON (the run store, the server), it is still there.
    assert result.model_validate_json(result.model_dump_json()).rounds == result.rounds
