"""Is the orchestrator ever what limits throughput? pacore against two yardsticks.

On one zero-latency fast backend (``bench/fastbackend.py``, its own process),
the same workload (P problems, each a full PaCoRe request) is run by:

- ceiling: a minimal pooled client, one ``httpx.AsyncClient`` (the HTTP
  library pacore's OpenAI backend uses, with the same lean transport,
  ``pacore.backends.http11``) per keep-alive connection, as many
  as pacore's backend opens, on a free list, that sends exactly the same
  calls (streamed, as pacore's are), round by round, with no orchestration. (httpcore's own pool rescans all its connections
  and queued requests on every call; one client per connection is the
  cheapest way to drive a server with httpx.)
- pacore: ``pacore.asolve`` through ``OpenAIBackend`` (one request per
  trajectory with ``n_mode="off"``; ``n`` batching with the default ``auto``);
- naive: the reference release's approach, a new client and connection with
  keep-alive off for every call and one request per trajectory, plain JSON
  (the release does not stream);
- naive_stream: the same, with its calls streamed as pacore's are. The
  ``pacore_over_naive_stream_n`` target compares pacore with this one: at
  zero latency every streamed token costs any client one server-sent event
  to parse, which the plain naive client never pays, so pacore against
  plain naive measures streaming, not orchestration. Both ratios are shown.

What streaming costs: the same ceiling and pacore clients on schedule [16]
with plain (non-streamed) answers, side by side, give the client CPU per
token of each way.

The full workload is 100 problems per schedule with 5 interleaved repeats:
since calls stream, a trajectory is 64 events on both sides of the 2 shared
cores, several times the work of one JSON answer, and 200 problems no longer
ran in 6 to 8 minutes; the ratios are medians of the same 5 repeats.

The machine's cores are shared by the backend process and the client, so
trajectories/s are those of this machine, not of a GPU server: what matters
are the ratios, measured in one run with the clients interleaved. CPU times
are the client process's own (``time.process_time``), per trajectory.

Also measured: the engine's own CPU against an in-process instant backend
(no HTTP at all), the round-to-round gap, peak RSS with 10,000 trajectories
in flight (a child process), and scale-out over 1, 2 and 4 endpoints that
each serve a fixed number of samples at once (streamed 8 tokens to an event,
so that on 2 shared cores the endpoints, not the per-token CPU measured above,
are the limit).

    python bench/orchestration.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from harness import BENCH_DIR, Clock, check_targets, emit, fast_backend, machine, peak_rss_mb, percentile, target_lines
from pacore import asolve
from pacore.backends.base import Backend, BaseBackend, Completion, GenerationParams, Message
from pacore.backends.http11 import LeanTransport
from pacore.backends.openai_http import DEFAULT_MAX_CONNECTIONS, OpenAIBackend
from pacore.prompts import SynthesisTemplate
from pacore.schedule import Schedule

MODEL = "fast"
CEILING_CONNECTIONS = DEFAULT_MAX_CONNECTIONS  # the same limit as pacore's backend
COMPLETION_TOKENS = 64
PARAMS = GenerationParams(max_tokens=COMPLETION_TOKENS)
PROBLEM = (
    "A train leaves the station at 9:00 travelling at 80 km/h; a second train leaves the same "
    "station at 10:30 on the same track at 120 km/h. At what time does the second train catch up "
    "with the first, and how far from the station are they then? Explain each step."
)
# The reference release used plain HTTP sessions; sharing one TLS context keeps
# the naive client's cost to what it really pays per call (a new connection),
# not the creation of a TLS context it never uses on http://.
_TLS = ssl.create_default_context()

TARGETS = {
    "pacore_over_ceiling": (0.85, True),
    "pacore_over_naive_stream_n": (3.0, True),
    "cpu_ms_per_trajectory": (0.5, False),
    "round_gap_p99_ms": (5.0, False),
    "peak_rss_mb_10k": (400.0, False),
    "scale_out_2_over_1": (1.8, True),
    "scale_out_4_over_1": (3.2, True),
}


@dataclass(frozen=True)
class Workload:
    problems: int
    in_flight: int
    repeats: int
    schedules: tuple[Schedule, ...] = (Schedule((16,)), Schedule((32, 4)))
    scale_problems: int = 24


FULL = Workload(problems=100, in_flight=16, repeats=5)
QUICK = Workload(problems=40, in_flight=16, repeats=1, scale_problems=8)


def problem(i: int) -> str:
    return f"Problem {i}. {PROBLEM}"


def split(k: int, max_n: int) -> list[int]:
    """The ``n`` of each call a round of ``k`` trajectories is sent as."""
    return [min(max_n, k - start) for start in range(0, k, max_n)]


# --- the yardstick clients ----------------------------------------------------

Post = Callable[[str, int], Awaitable[list[str]]]


def chat_body(content: str, n: int, stream: bool) -> bytes:
    """The body pacore's OpenAI backend sends for one call (same fields)."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": content}],
        "model": MODEL,
        "temperature": PARAMS.temperature,
        "top_p": PARAMS.top_p,
        "max_tokens": PARAMS.max_tokens,
    }
    if n > 1:
        body["n"] = n
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def contents(response: httpx.Response) -> list[str]:
    """Each choice's text, from a plain answer or a server-sent event stream."""
    response.raise_for_status()
    if "event-stream" not in response.headers.get("content-type", ""):
        return [choice["message"]["content"] for choice in response.json()["choices"]]
    texts: dict[int, list[str]] = {}
    for line in response.content.split(b"\n"):
        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
            continue
        for choice in _decode_json(line[5:].strip().decode())[0]["choices"]:
            piece = choice["delta"].get("content")
            if piece:
                texts.setdefault(choice["index"], []).append(piece)
    return ["".join(texts[index]) for index in sorted(texts)]


async def direct_problem(post: Post, text: str, schedule: Schedule, max_n: int, template: SynthesisTemplate) -> int:
    """One problem's calls, round by round, with no orchestration; returns its trajectories."""
    content, ks, done = text, schedule.ks, 0
    for index, k in enumerate(ks):
        replies = await asyncio.gather(*(post(content, n) for n in split(k, max_n)))
        references = [reply for call in replies for reply in call]
        done += len(references)
        if index + 1 < len(ks):
            content = template.render(text, references, index + 2, len(ks))
    return done


class ConnectionPool:
    """The ceiling's pool: idle keep-alive connections on a free list.

    Each connection is its own one-connection ``httpx.AsyncClient``, because
    httpcore's own pool rescans every connection it holds on each request.
    """

    def __init__(self, size: int) -> None:
        self.idle: list[httpx.AsyncClient] = []
        self.clients: list[httpx.AsyncClient] = []
        self.gate = asyncio.Semaphore(size)

    async def post(self, url: str, body: bytes) -> httpx.Response:
        async with self.gate:
            client = self.idle.pop() if self.idle else self._new_client()
            try:
                return await client.post(url, content=body, headers=_JSON)
            finally:
                self.idle.append(client)

    def _new_client(self) -> httpx.AsyncClient:
        # The transport pacore's backend uses for http://: a ceiling on httpx's own would be lower than pacore.
        client = httpx.AsyncClient(transport=LeanTransport(), timeout=60)
        self.clients.append(client)
        return client

    async def aclose(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self.clients))


def pooled_post(pool: ConnectionPool, url: str, stream: bool = True) -> Post:
    async def post(content: str, n: int) -> list[str]:
        return contents(await pool.post(url, chat_body(content, n, stream)))

    return post


def naive_post(url: str, stream: bool = False) -> Post:
    async def post(content: str, n: int) -> list[str]:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(verify=_TLS, limits=limits, timeout=60) as client:
            response = await client.post(url, content=chat_body(content, 1, stream), headers=_CLOSE)
        return contents(response)

    return post


_JSON = {"Content-Type": "application/json"}
#: The cheapest JSON decoding of a chunk (what pacore's backend uses too).
_decode_json = json.JSONDecoder().raw_decode
_CLOSE = {**_JSON, "Connection": "close"}


# --- pacore, with its calls timed at the Backend interface ----------------------


class TimedCalls(BaseBackend):
    """Wraps one problem's backend to record when each engine call starts and ends.

    Bench-side only: the engine runs exactly as in normal use.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.calls: list[tuple[float, float]] = []

    name = property(lambda self: self.inner.name)  # type: ignore[assignment]
    model = property(lambda self: self.inner.model)  # type: ignore[assignment]
    max_n = property(lambda self: self.inner.max_n)  # type: ignore[assignment]

    async def generate(self, messages: Sequence[Message], n: int, params: GenerationParams) -> list[Completion]:
        started = time.perf_counter()
        try:
            return await self.inner.generate(messages, n, params)
        finally:
            self.calls.append((started, time.perf_counter()))

    def round_gaps(self, schedule: Schedule, max_n: int) -> list[float]:
        """From each round's last call ending to the next round's first call starting."""
        calls = sorted(self.calls)
        gaps, start = [], 0
        bounds = []
        for k in schedule.ks:
            count = len(split(k, max_n))
            bounds.append(calls[start : start + count])
            start += count
        for previous, following in zip(bounds, bounds[1:], strict=False):
            gaps.append(min(s for s, _ in following) - max(e for _, e in previous))
        return gaps


class InstantBackend(BaseBackend):
    """In-process, zero-cost completions: what remains is the engine's own CPU."""

    name = model = "instant"

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self.text = " ".join(["word"] * COMPLETION_TOKENS)

    async def generate(self, messages: Sequence[Message], n: int, params: GenerationParams) -> list[Completion]:
        return [
            Completion(text=self.text, finish_reason="stop", prompt_tokens=100, completion_tokens=COMPLETION_TOKENS)
            for _ in range(n)
        ]


# --- running a workload ---------------------------------------------------------


@dataclass
class Run:
    trajectories: int
    wall_s: float
    cpu_s: float
    gaps: list[float] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.trajectories / self.wall_s

    @property
    def cpu_ms(self) -> float:
        return self.cpu_s / self.trajectories * 1000


async def run_all(count: int, in_flight: int, one: Callable[[int], Awaitable[int]]) -> tuple[int, Clock]:
    """``one(i)`` for each problem, ``in_flight`` at a time; returns the trajectories done."""
    gate = asyncio.Semaphore(in_flight)

    async def gated(i: int) -> int:
        async with gate:
            return await one(i)

    with Clock() as clock:
        done = sum(await asyncio.gather(*(gated(i) for i in range(count))))
    return done, clock


async def run_direct(post: Post, workload: Workload, schedule: Schedule, max_n: int) -> Run:
    template = SynthesisTemplate.default()
    done, clock = await run_all(
        workload.problems,
        workload.in_flight,
        lambda i: direct_problem(post, problem(i), schedule, max_n, template),
    )
    return Run(done, clock.wall, clock.cpu)


async def run_pacore(backend: Backend, workload: Workload, schedule: Schedule, problems: int | None = None) -> Run:
    timed: list[TimedCalls] = []

    async def one(i: int) -> int:
        calls = TimedCalls(backend)
        timed.append(calls)
        result = await asolve(problem(i), schedule=schedule, backend=calls, params=PARAMS, seed=i)
        return result.usage.calls - result.usage.failed_calls

    done, clock = await run_all(problems or workload.problems, workload.in_flight, one)
    gaps = [gap for calls in timed for gap in calls.round_gaps(schedule, backend.max_n)]
    return Run(done, clock.wall, clock.cpu, gaps)


async def run_batch(backend: Backend, workload: Workload, schedule: Schedule) -> Run:
    """The batch runner behind ``pacore run``: each problem committed to its run store."""
    from pacore.eval.datasets import Problem
    from pacore.eval.runner import Arm, run_dataset

    problems = [
        Problem(id=f"p{i}", messages=[{"role": "user", "content": problem(i)}]) for i in range(workload.problems)
    ]
    with tempfile.TemporaryDirectory() as tmp, Clock() as clock:
        await run_dataset(
            Path(tmp) / "run", problems, dataset_path=Path(tmp) / "bench.jsonl",
            arm=Arm.build("pacore", schedule=schedule), backend=backend, params=PARAMS,
            concurrency=workload.in_flight,
        )  # fmt: skip
    return Run(workload.problems * schedule.total_calls, clock.wall, clock.cpu)


CLIENTS = {
    "ceiling": "minimal pooled client, one request per trajectory",
    "pacore": "pacore.asolve, one request per trajectory (n_mode=off)",
    "naive": "new connection per call, keep-alive off, one request per trajectory, plain JSON (the release)",
    "naive_stream": "as naive, streamed as pacore's calls are",
    "ceiling_n": "minimal pooled client, one request per round (n batching)",
    "pacore_n": "pacore.asolve, n batching (n_mode=auto, the default)",
    "pacore_run": "batch runner (pacore run), n batching, a store commit per problem",
}
#: Measured on the first schedule only, for what streaming costs per token.
PLAIN_CLIENTS = {
    "ceiling_plain": "as ceiling, answers not streamed",
    "pacore_plain": "as pacore, from a server that answers plain JSON",
}


async def measure_schedule(
    url: str, workload: Workload, schedule: Schedule, plain_url: str | None = None
) -> dict[str, Any]:
    """Every client on one schedule, warmed up, then repeats interleaved; medians kept.

    Connections stay open across repeats (steady state, as in a long batch
    run); a warm-up pass of each client opens them first.
    """
    chat_url = url + "/chat/completions"
    pool = ConnectionPool(CEILING_CONNECTIONS)
    batch = max(schedule.ks)
    plain = OpenAIBackend(plain_url or url, model=MODEL, n_mode="off")
    async with OpenAIBackend(url, model=MODEL, n_mode="off") as single, OpenAIBackend(url, model=MODEL) as batched:
        clients: dict[str, Callable[[Workload], Awaitable[Run]]] = {
            "ceiling": lambda w: run_direct(pooled_post(pool, chat_url), w, schedule, 1),
            "pacore": lambda w: run_pacore(single, w, schedule),
            "naive": lambda w: run_direct(naive_post(chat_url), w, schedule, 1),
            "naive_stream": lambda w: run_direct(naive_post(chat_url, stream=True), w, schedule, 1),
            "ceiling_n": lambda w: run_direct(pooled_post(pool, chat_url), w, schedule, batch),
            "pacore_n": lambda w: run_pacore(batched, w, schedule),
            "pacore_run": lambda w: run_batch(batched, w, schedule),
        }
        if plain_url:
            clients["ceiling_plain"] = lambda w: run_direct(pooled_post(pool, chat_url, False), w, schedule, 1)
            clients["pacore_plain"] = lambda w: run_pacore(plain, w, schedule)
        warm_up = replace(workload, problems=workload.in_flight)
        for run in clients.values():
            await run(warm_up)
        runs: dict[str, list[Run]] = {name: [] for name in clients}
        for repeat in range(workload.repeats):
            # Every other repeat in reverse order, so a drift in the machine's load evens out.
            order = list(clients) if repeat % 2 == 0 else list(reversed(clients))
            for name in order:
                runs[name].append(await clients[name](workload))
    await pool.aclose()
    await plain.aclose()
    figures: dict[str, Any] = {}
    for name, results in runs.items():
        figures[name] = {
            "trajectories_per_s": round(statistics.median(r.per_s for r in results), 1),
            "cpu_ms_per_trajectory": round(statistics.median(r.cpu_ms for r in results), 3),
        }

    def ratio(a: str, b: str) -> float:
        """Median over repeats of a/b, each pair measured back to back."""
        return statistics.median(x.per_s / y.per_s for x, y in zip(runs[a], runs[b], strict=True))

    cpu = {name: figures[name]["cpu_ms_per_trajectory"] for name in clients}
    figures["pacore_over_ceiling"] = round(ratio("pacore", "ceiling"), 3)
    figures["pacore_n_over_ceiling_n"] = round(ratio("pacore_n", "ceiling_n"), 3)
    figures["pacore_run_over_ceiling_n"] = round(ratio("pacore_run", "ceiling_n"), 3)
    figures["pacore_over_naive"] = round(ratio("pacore", "naive"), 2)
    figures["pacore_over_naive_n"] = round(ratio("pacore_n", "naive"), 2)
    figures["pacore_over_naive_stream"] = round(ratio("pacore", "naive_stream"), 2)
    figures["pacore_over_naive_stream_n"] = round(ratio("pacore_n", "naive_stream"), 2)
    figures["pacore_over_ceiling_cpu"] = round(cpu["ceiling"] / cpu["pacore"], 3)
    figures["pacore_added_cpu_ms_per_trajectory"] = round(cpu["pacore"] - cpu["ceiling"], 3)
    figures["pacore_n_added_cpu_ms_per_trajectory"] = round(cpu["pacore_n"] - cpu["ceiling_n"], 3)
    if plain_url:
        # Client CPU per completion token, streamed and not: what streaming costs.
        per_token = {name: round(cpu[name] / COMPLETION_TOKENS * 1000, 2) for name in cpu}
        figures["streaming_cost_us_per_token"] = {
            "ceiling": per_token["ceiling"], "ceiling_plain": per_token["ceiling_plain"],
            "pacore": per_token["pacore"], "pacore_plain": per_token["pacore_plain"],
            "ceiling_added": round(per_token["ceiling"] - per_token["ceiling_plain"], 2),
            "pacore_added": round(per_token["pacore"] - per_token["pacore_plain"], 2),
        }  # fmt: skip
    gaps = [g * 1000 for r in runs["pacore"] + runs["pacore_n"] for g in r.gaps]
    figures["round_gap_saturated_p50_ms"] = round(percentile(gaps, 50), 3)
    figures["round_gap_saturated_p99_ms"] = round(percentile(gaps, 99), 3)
    return figures


async def engine_cpu(workload: Workload, schedule: Schedule, max_n: int) -> float:
    """CPU ms per trajectory of the engine alone (in-process instant backend)."""
    await run_pacore(InstantBackend(max_n), workload, schedule)  # warm up
    run = await run_pacore(InstantBackend(max_n), workload, schedule)
    return run.cpu_ms


async def isolated_gaps(url: str, schedule: Schedule, problems: int) -> list[float]:
    """Round gaps in ms of requests run one at a time (nothing else on the loop)."""
    gaps: list[float] = []
    async with OpenAIBackend(url, model=MODEL) as backend:
        for i in range(problems):
            calls = TimedCalls(backend)
            await asolve(problem(i), schedule=schedule, backend=calls, params=PARAMS, seed=i)
            gaps += calls.round_gaps(schedule, backend.max_n)
    return [g * 1000 for g in gaps]


SCALE_CONCURRENCY, SCALE_TTFT_MS, SCALE_TOKENS_PER_S, SCALE_CHUNK_TOKENS = 4, 20, 800, 8


async def scale_out(workload: Workload) -> dict[str, Any]:
    """Throughput over 1, 2 and 4 endpoints that are each the limit (through the router)."""
    from pacore.backends import open_backend

    schedule = Schedule((16,))
    per_call_s = SCALE_TTFT_MS / 1000 + COMPLETION_TOKENS / SCALE_TOKENS_PER_S
    figures: dict[str, Any] = {
        "endpoint": f"{SCALE_CONCURRENCY} samples at once, {per_call_s * 1000:.0f} ms per call "
        f"(capacity {SCALE_CONCURRENCY / per_call_s:.0f} trajectories/s each; {SCALE_CHUNK_TOKENS} tokens an event)",
        "schedule": schedule.as_list(),
    }
    gaps: list[float] = []
    for endpoints in (1, 2, 4):
        with fast_backend(
            "--endpoints", endpoints, "--concurrency", SCALE_CONCURRENCY, "--ttft-ms", SCALE_TTFT_MS,
            "--tokens-per-s", SCALE_TOKENS_PER_S, "--completion-tokens", COMPLETION_TOKENS,
            "--chunk-tokens", SCALE_CHUNK_TOKENS,
        ) as server:  # fmt: skip
            backend = open_backend(server.urls, model=MODEL, n_mode="off")
            try:
                run = await run_pacore(backend, workload, schedule, workload.scale_problems * endpoints)
            finally:
                await backend.aclose()
            samples = [s["samples"] for s in server.stats()]
        gaps += [g * 1000 for g in run.gaps]
        figures[f"endpoints_{endpoints}"] = {
            "trajectories_per_s": round(run.per_s, 1),
            "samples_per_endpoint": samples,
            "client_cpu_share": round(run.cpu_s / run.wall_s, 2),
        }
    one = figures["endpoints_1"]["trajectories_per_s"]
    figures["scale_out_2_over_1"] = round(figures["endpoints_2"]["trajectories_per_s"] / one, 2)
    figures["scale_out_4_over_1"] = round(figures["endpoints_4"]["trajectories_per_s"] / one, 2)
    figures["round_gap_p50_ms"] = round(percentile(gaps, 50), 3)
    figures["round_gap_p99_ms"] = round(percentile(gaps, 99), 3)
    figures["round_gaps"] = len(gaps)
    return figures


# --- 10,000 trajectories in flight, in a child process ----------------------------

RSS_TRAJECTORIES = 10_000


async def rss_child(url: str) -> dict[str, Any]:
    baseline = peak_rss_mb()
    async with OpenAIBackend(url, model=MODEL, n_mode="off") as backend:
        with Clock() as clock:
            result = await asolve(problem(0), schedule=[RSS_TRAJECTORIES], backend=backend, params=PARAMS)
    return {
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_mb": round(baseline, 1),
        "trajectories": result.usage.calls,
        "failed": result.usage.failed_calls,
        "seconds": round(clock.wall, 1),
    }


def peak_rss_10k() -> dict[str, Any]:
    """One request of schedule [10000], one request per trajectory, 200 ms to first token."""
    with fast_backend("--ttft-ms", 200, "--completion-tokens", COMPLETION_TOKENS) as server:
        child = subprocess.run(
            [sys.executable, str(BENCH_DIR / "orchestration.py"), "--rss-child", server.url],
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(child.stdout)


# --- report -----------------------------------------------------------------------


async def measure(workload: Workload) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "machine": machine(),
        "workload": {
            "problems": workload.problems,
            "problems_in_flight": workload.in_flight,
            "repeats": workload.repeats,
            "completion_tokens": COMPLETION_TOKENS,
            "schedules": [s.as_list() for s in workload.schedules],
        },
        "clients": {**CLIENTS, **PLAIN_CLIENTS},
    }
    with (
        fast_backend("--completion-tokens", COMPLETION_TOKENS) as server,
        fast_backend("--completion-tokens", COMPLETION_TOKENS, "--stream-support", "ignore") as plain_server,
    ):
        for i, schedule in enumerate(workload.schedules):
            figures[f"schedule_{schedule.text()}"] = await measure_schedule(
                server.url, workload, schedule, plain_server.url if i == 0 else None
            )
        gaps = await isolated_gaps(server.url, Schedule((32, 4)), max(20, workload.problems // 4))
    figures["engine_cpu_ms_per_trajectory"] = {
        f"{schedule.text()}_max_n_{max_n}": round(await engine_cpu(workload, schedule, max_n), 3)
        for schedule in workload.schedules
        for max_n in (1, 128)
    }
    figures["round_gap_isolated_p50_ms"] = round(percentile(gaps, 50), 3)
    figures["round_gap_isolated_p99_ms"] = round(percentile(gaps, 99), 3)
    figures["scale_out"] = await scale_out(workload)
    figures["rss_10k"] = peak_rss_10k()
    sections = [figures[f"schedule_{s.text()}"] for s in workload.schedules]
    figures["pacore_over_ceiling"] = min(s["pacore_over_ceiling"] for s in sections)
    figures["pacore_over_naive_n"] = min(s["pacore_over_naive_n"] for s in sections)
    figures["pacore_over_naive_stream_n"] = min(s["pacore_over_naive_stream_n"] for s in sections)
    figures["cpu_ms_per_trajectory"] = max(figures["engine_cpu_ms_per_trajectory"].values())
    figures["round_gap_p99_ms"] = figures["scale_out"]["round_gap_p99_ms"]
    figures["round_gap_saturated_p99_ms"] = max(s["round_gap_saturated_p99_ms"] for s in sections)
    figures["peak_rss_mb_10k"] = figures["rss_10k"]["peak_rss_mb"]
    figures["scale_out_2_over_1"] = figures["scale_out"]["scale_out_2_over_1"]
    figures["scale_out_4_over_1"] = figures["scale_out"]["scale_out_4_over_1"]
    figures["targets"] = check_targets(figures, TARGETS)
    return figures


def report(figures: dict[str, Any]) -> list[str]:
    w = figures["workload"]
    lines = [
        f"Orchestration: {w['problems']} problems per schedule, {w['problems_in_flight']} in flight, "
        f"{w['completion_tokens']}-token completions, median of {w['repeats']} interleaved repeat(s), "
        f"against a zero-latency fast backend; {figures['machine']['cores']} cores shared by the "
        "backend process and the client process. Trajectories/s are this machine's, not a GPU "
        "server's: read the ratios. CPU is the client process's own time per trajectory.",
        "",
    ]
    lines += [f"  {name:13} = {what}" for name, what in figures["clients"].items()]
    for schedule in w["schedules"]:
        s = figures[f"schedule_{Schedule(tuple(schedule)).text()}"]
        lines.append(f"\nschedule {schedule}:        trajectories/s   client CPU ms/trajectory")
        for name in figures["clients"]:
            if name not in s:
                continue
            lines.append(f"  {name:13} {s[name]['trajectories_per_s']:18.1f} {s[name]['cpu_ms_per_trajectory']:20.3f}")
        lines.append(
            f"  pacore/ceiling {s['pacore_over_ceiling']:.3f}, pacore_n/ceiling_n {s['pacore_n_over_ceiling_n']:.3f}, "
            f"pacore_run/ceiling_n {s['pacore_run_over_ceiling_n']:.3f}, pacore/naive {s['pacore_over_naive']:.2f}, "
            f"pacore_n/naive {s['pacore_over_naive_n']:.2f}; against naive_stream: pacore "
            f"{s['pacore_over_naive_stream']:.2f}, pacore_n {s['pacore_over_naive_stream_n']:.2f}"
        )
        lines.append(
            f"  CPU pacore adds over the same HTTP calls: {s['pacore_added_cpu_ms_per_trajectory']:.3f} ms/trajectory "
            f"(n batching: {s['pacore_n_added_cpu_ms_per_trajectory']:.3f}); ceiling CPU / pacore CPU "
            f"{s['pacore_over_ceiling_cpu']:.3f}, the ratio if the client's CPU alone were the limit"
        )
        lines.append(
            f"  round gap with the client CPU saturated: p50 {s['round_gap_saturated_p50_ms']:.2f} ms, "
            f"p99 {s['round_gap_saturated_p99_ms']:.2f} ms (waiting for the event loop behind other requests' HTTP work)"
        )
    first = figures[f"schedule_{Schedule(tuple(w['schedules'][0])).text()}"]
    if "streaming_cost_us_per_token" in first:
        cost = first["streaming_cost_us_per_token"]
        lines.append(
            f"\nwhat streaming costs per token (client CPU us per completion token, schedule {w['schedules'][0]}, "
            f"one run):\n  ceiling {cost['ceiling']:.2f} streamed vs {cost['ceiling_plain']:.2f} plain "
            f"(+{cost['ceiling_added']:.2f}); pacore {cost['pacore']:.2f} streamed vs {cost['pacore_plain']:.2f} "
            f"plain (+{cost['pacore_added']:.2f})"
        )
    lines.append("\nengine alone (in-process instant backend, no HTTP), CPU ms per trajectory:")
    for key, value in figures["engine_cpu_ms_per_trajectory"].items():
        lines.append(f"  {key:24} {value:.3f}")
    so = figures["scale_out"]
    lines.append(f"\nscale-out, schedule {so['schedule']}, endpoints each limited to {so['endpoint']}:")
    for endpoints in (1, 2, 4):
        e = so[f"endpoints_{endpoints}"]
        lines.append(
            f"  {endpoints} endpoint(s): {e['trajectories_per_s']:7.1f} trajectories/s, samples served per endpoint "
            f"{e['samples_per_endpoint']}, client CPU {e['client_cpu_share']:.0%} of a core"
        )
    lines.append(
        f"  2 endpoints / 1: {so['scale_out_2_over_1']:.2f}x, 4 endpoints / 1: {so['scale_out_4_over_1']:.2f}x"
    )
    lines.append(
        f"\nround gap (last call of a round returns -> first call of the next starts, at the Backend interface):\n"
        f"  endpoints the limit (scale-out runs): p50 {so['round_gap_p50_ms']:.2f} ms, p99 {so['round_gap_p99_ms']:.2f} ms "
        f"over {so['round_gaps']} gaps\n"
        f"  requests one at a time: p50 {figures['round_gap_isolated_p50_ms']:.2f} ms, "
        f"p99 {figures['round_gap_isolated_p99_ms']:.2f} ms"
    )
    rss = figures["rss_10k"]
    lines.append(
        f"\n10,000 trajectories in flight (one request of schedule [10000], one HTTP call each): peak RSS "
        f"{rss['peak_rss_mb']:.0f} MB (before the request {rss['rss_before_mb']:.0f} MB), {rss['seconds']} s"
    )
    return [*lines, "\ntargets:", *target_lines(figures["targets"])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller workload (under a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    parser.add_argument("--rss-child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        print(json.dumps(asyncio.run(rss_child(args.rss_child))))
        return
    figures = asyncio.run(measure(QUICK if args.quick else FULL))
    emit(figures, args.json, report(figures))


if __name__ == "__main__":
    main()
