"""Soak ``pacore serve``: many bursts of 200 concurrent clients, misbehaving on purpose.

The real command runs in its own process in front of the fast backend
(``bench/fastbackend.py``), with a concurrency limit below the number of
clients and a small body limit. Each burst mixes streamed and plain PaCoRe
requests (``pacore-2/fast``), clients that hang up after the first event,
invalid JSON, a wrong content type, oversize bodies and unknown routes; a
client refused with 429 waits and tries again. Every reply is classified:

- ``ok``: a full answer (a streamed one ends with ``[DONE]``);
- ``refused_as_expected``: the bad inputs' 400, 404, 413 and 415;
- ``error_<status or code>``: any other error in OpenAI's shape, such as a
  request stuck past the server's ``--deadline`` (target 0);
- ``broken``: a cut connection or a stream that ended without ``[DONE]``
  or an error event (target 0);
- ``bad_shape``: an error that is not OpenAI's JSON shape (target 0).

The server's resident memory (its own ``process_resident_memory_bytes``
from ``/metrics``) is read after every burst: after the first burst has
warmed it up, it must stay flat. Finally SIGTERM must stop it with exit code 0.

``--hostile`` attacks instead, all at once for a bounded time on loopback:
slowloris clients sending headers or a body a byte every half second,
huge bodies (7 MB of numbers, 230,000 messages, a 3 MB model name, one
over the body limit) and 10,000-entry schedules (as a list and in a model
name); then streaming clients that never read their answer (twice as many
as the server's request slots) while ordinary clients keep asking. A probe
times ``/health`` from its own thread all along. It reports every refusal and how long it took, ``/health``'s
latency, the clients the server cut and why, and the server's memory before
and after; ``--write`` puts that report into ``bench/RELIABILITY.md``.

    python bench/soak_server.py [--quick] [--json] [--bursts N]
    python bench/soak_server.py --hostile [--json] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from harness import BENCH_DIR, HOSTILE_SECTION, check_targets, emit, fast_backend, machine, target_lines

CLIENTS = 200
CONCURRENCY = 64
MAX_BODY_BYTES = 64 * 1024
#: Each request takes milliseconds; one still running after this is stuck (it fails with a 504).
DEADLINE_S = 20
PACORE = Path(sys.executable).parent / "pacore"
KINDS = ("stream",) * 10 + ("plain",) * 4 + ("give_up", "bad_json", "wrong_type", "oversize", "unknown_route")
EXPECTED_ERRORS = {"bad_json": 400, "wrong_type": 415, "oversize": 413, "unknown_route": 404}
TARGETS = {
    "broken": (0, False),
    "bad_shape": (0, False),
    "unexpected_errors": (0, False),
    "rss_growth_mb": (20.0, False),
    "exit_code": (0, False),
}


@contextmanager
def serve(backend_url: str, *options: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """The real ``pacore serve`` in its own process; yields its base URL and the process."""
    process = subprocess.Popen(
        [str(PACORE), "serve", "--port", "0", "--backend", backend_url, "--model", "fast", "--schedule", "2",
         "--grace-period", "5", *(options or ("--max-concurrent-requests", str(CONCURRENCY),
                                              "--max-body-bytes", str(MAX_BODY_BYTES), "--deadline", str(DEADLINE_S)))],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        found = re.search(r"listening on (http://\S+)", process.stdout.readline())
        if found is None:
            raise RuntimeError("pacore serve did not start")
        yield found.group(1), process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def is_openai_error(text: str) -> bool:
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}


async def one_client(client: httpx.AsyncClient, kind: str) -> tuple[str, int]:
    """``(outcome, retries)`` of one client of kind ``kind``."""
    messages = [{"role": "user", "content": "How many primes are below 100?"}]
    request: dict[str, Any] = {"method": "POST", "url": "/v1/chat/completions"}
    if kind == "unknown_route":
        request = {"method": "GET", "url": "/v1/nothing-here"}
    elif kind == "bad_json":
        request["content"] = b'{"model": "pacore-2/fast", "messages": ['
    elif kind == "wrong_type":
        request |= {
            "content": json.dumps({"model": "m", "messages": messages}),
            "headers": {"Content-Type": "text/plain"},
        }
    elif kind == "oversize":
        request["json"] = {"model": "m", "messages": [{"role": "user", "content": "x" * 2 * MAX_BODY_BYTES}]}
    else:
        request["json"] = {"model": "pacore-2/fast", "messages": messages, "stream": kind != "plain"}
    for retries in range(100):
        try:
            async with client.stream(**request) as response:
                if response.status_code == 429:
                    await response.aread()
                    await asyncio.sleep(random.uniform(0.05, 0.5))
                    continue
                return await classify(response, kind), retries
        except httpx.HTTPError:
            return "broken", retries
    return "still_429", 100


async def classify(response: httpx.Response, kind: str) -> str:
    if response.status_code != 200:
        text = (await response.aread()).decode(errors="replace")
        return f"error_{response.status_code}" if is_openai_error(text) else "bad_shape"
    if kind == "plain":
        return "ok" if json.loads(await response.aread())["choices"][0]["message"]["content"] else "bad_shape"
    last = ""
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            last = line.removeprefix("data: ")
            if kind == "give_up":
                return "ok"  # hangs up here, on purpose
    if last == "[DONE]":
        return "ok"
    return f"error_{json.loads(last)['error'].get('code')}" if is_openai_error(last) else "broken"


async def burst(base_url: str, seed: int) -> tuple[Counter[str], int]:
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(CLIENTS)]
    rng.shuffle(kinds)
    # No keep-alive: a pooled connection the server closes as idle just when it is reused
    # fails in any HTTP client; only failures of the server itself should count here.
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
        results = await asyncio.gather(*(one_client(client, kind) for kind in kinds))
    outcomes = Counter(outcome for outcome, _ in results)
    # An expected refusal of a bad input counts as handled, not as an error to look at.
    for kind, status in EXPECTED_ERRORS.items():
        expected = sum(
            1 for k, (outcome, _) in zip(kinds, results, strict=True) if k == kind and outcome == f"error_{status}"
        )
        outcomes[f"error_{status}"] -= expected
        outcomes["refused_as_expected"] += expected
    return +outcomes, sum(retries for _, retries in results)


def resident_mb(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    return float(re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M).group(1)) / 2**20


async def measure(bursts: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"machine": machine(), "bursts": bursts, "clients_per_burst": CLIENTS}
    totals: Counter[str] = Counter()
    rss: list[float] = []
    retries = 0
    with fast_backend("--completion-tokens", 16, "--ttft-ms", 5) as backend, serve(backend.url) as (url, process):
        for seed in range(bursts):
            outcomes, burst_retries = await burst(url, seed)
            totals.update(outcomes)
            retries += burst_retries
            rss.append(round(resident_mb(url), 1))
        process.send_signal(signal.SIGTERM)
        figures["exit_code"] = process.wait(timeout=30)
    figures["requests"] = bursts * CLIENTS
    figures["outcomes"] = dict(sorted(totals.items()))
    figures["retried_429"] = retries
    figures["broken"] = totals["broken"]
    figures["bad_shape"] = totals["bad_shape"]
    figures["unexpected_errors"] = sum(n for outcome, n in totals.items() if outcome.startswith("error_"))
    figures["rss_mb"] = rss
    figures["rss_growth_mb"] = round(max(rss[1:], default=rss[0]) - rss[min(1, len(rss) - 1)], 1)
    figures["targets"] = check_targets(figures, TARGETS)
    return figures


def report(figures: dict[str, Any]) -> list[str]:
    return [
        f"pacore serve soak: {figures['bursts']} bursts of {figures['clients_per_burst']} concurrent clients "
        f"({figures['requests']} requests, {figures['retried_429']} retries after a 429), "
        f"limit {CONCURRENCY} at once; {figures['machine']['cores']} shared cores.",
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in figures["outcomes"].items()),
        f"server RSS after each burst (MB): {figures['rss_mb']}",
        f"exit code after SIGTERM: {figures['exit_code']}",
        "targets:",
        *target_lines(figures["targets"]),
    ]


# --- hostile mode -------------------------------------------------------------------------

HOSTILE_SLOTS = 4
HOSTILE_TIMEOUT_S = 2.0
#: Long enough to upload 7 MB on a loaded machine: the huge bodies must reach the parser.
HOSTILE_BODY_TIMEOUT_S = 10.0
#: What the slow readers ask for: 2M tokens in chunks of 2,000, about 14 MB of events each.
LONG_ANSWER_TOKENS = 2_000_000
HOSTILE_DEADLINE_S = 20
SLOW_READERS = 2 * HOSTILE_SLOTS
SLOWLORIS = 20
HUGE_REPEATS = 3
SCHEDULES = 40
ORDINARY = 20
#: The longest any client waits for the server to end it; the whole attack is bounded by it.
ATTACK_CAP_S = 30.0
HOSTILE_TARGETS = {
    "health_p90_ms": (100.0, False),
    "unexpected": (0, False),
    "ordinary_ok_share": (1.0, True),
    "slots_held_at_end": (0, False),
}


def hostile_bodies() -> dict[str, bytes]:
    def chat(**fields: Any) -> bytes:
        body = {"model": "fast", "messages": [{"role": "user", "content": "Why?"}], **fields}
        return json.dumps(body, separators=(",", ":")).encode()

    ones = ",".join(["1"] * 10_000)
    return {
        "7 MB of numbers": chat(user=[0] * 3_500_000),
        "230,000 messages": json.dumps(
            {"model": "fast", "messages": [{"role": "user", "content": "a"}] * 230_000}
        ).encode(),
        "3 MB model name": chat(model=f"pacore-{ones * 150}/fast"),
        "9 MB body (over the limit)": chat(messages=[{"role": "user", "content": "x" * 9_000_000}]),
        "10k schedule list": chat(pacore={"schedule": [1] * 10_000}),
        "10k schedule in the model name": chat(model=f"pacore-{ones}/fast"),
    }


async def raw_request(url: str, head: bytes, trickle: bytes | None, body: bytes = b"") -> tuple[int | None, float]:
    """Send ``head`` (and ``body``), then ``trickle`` a byte every half second; ``(status or None, seconds)``
    until the server answers or closes."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + body)

    async def drip() -> None:
        for byte in (trickle or b"")[:200]:
            await asyncio.sleep(0.5)
            writer.write(bytes([byte]))

    dripping = asyncio.create_task(drip())
    try:
        line = await asyncio.wait_for(reader.readline(), ATTACK_CAP_S)
        status = int(line.split()[1]) if line.startswith(b"HTTP/") else None
    except (TimeoutError, OSError):
        status = None
    finally:
        dripping.cancel()
        writer.close()
    return status, time.monotonic() - started


async def slow_reader(url: str, done: asyncio.Event) -> None:
    """A streamed pass-through request whose client never reads a byte, until ``done``."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "model": "pacore-1/fast",
            "stream": True,
            "max_tokens": LONG_ANSWER_TOKENS,
            "messages": [{"role": "user", "content": "Talk."}],
        }
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, int(port)))
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        await loop.sock_sendall(sock, (head + body).encode())
        # The server's view of it is what counts (a reset sent into a zero window may never arrive).
        await asyncio.wait_for(done.wait(), ATTACK_CAP_S)
    finally:
        sock.close()


async def ordinary(client: httpx.AsyncClient) -> tuple[str, float]:
    """``(outcome, seconds until answered)`` of a plain request retried while refused with 429."""
    body = {"model": "pacore-2/fast", "max_tokens": 16, "messages": [{"role": "user", "content": "How many primes?"}]}
    started = time.monotonic()
    for _ in range(200):
        response = await client.post("/v1/chat/completions", json=body)
        if response.status_code != 429:
            outcome = "ok" if response.status_code == 200 else f"error_{response.status_code}"
            return outcome, time.monotonic() - started
        await asyncio.sleep(0.25)
    return "still_429", time.monotonic() - started


TCP_ESTABLISHED = 1


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def cut_counts(base_url: str) -> dict[str, int]:
    text = httpx.get(f"{base_url}/metrics").text
    return {
        m[1]: int(float(m[2])) for m in re.finditer(r'^pacore_clients_cut_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    }


class HealthProbe(threading.Thread):
    """Times ``GET /health`` every 20 ms from its own thread, so that the attackers' work never counts."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                client.get("/health")
                self.latencies.append(time.monotonic() - started)
                time.sleep(0.02)


async def attack(url: str, bodies: dict[str, bytes]) -> dict[str, Any]:
    """The parser and the timeouts first, with every slot free; then streams nobody reads, with ordinary clients."""
    refusals: dict[str, list[tuple[int | None, float]]] = {}

    async def huge(name: str, body: bytes) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for _ in range(HUGE_REPEATS if "schedule" not in name else SCHEDULES // 2):
                started = time.monotonic()
                try:
                    status: int | None = (await client.post("/v1/chat/completions", content=body)).status_code
                except httpx.HTTPError:
                    status = None
                refusals.setdefault(name, []).append((status, time.monotonic() - started))

    async def slowloris(name: str, head: bytes, trickle: bytes) -> None:
        results = await asyncio.gather(*(raw_request(url, head, trickle) for _ in range(SLOWLORIS)))
        refusals[name] = list(results)

    chat_head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    await asyncio.gather(
        slowloris("slow headers", chat_head, b"X-Slow: " + b"a" * 100),
        slowloris("slow body", chat_head + b"Content-Length: 100000\r\n\r\n", b" " * 100),
        *(huge(name, body) for name, body in bodies.items()),
    )
    done = asyncio.Event()
    readers = [asyncio.create_task(slow_reader(url, done)) for _ in range(SLOW_READERS)]
    await asyncio.sleep(0.5)  # the slow readers hold every slot now
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        answered = await asyncio.gather(*(ordinary(client) for _ in range(ORDINARY)))
    done.set()
    await asyncio.gather(*readers)
    return {"refusals": refusals, "ordinary": Counter(outcome for outcome, _ in answered),
            "ordinary_waited_s": [seconds for _, seconds in answered]}  # fmt: skip


#: What each attack may get; ``None``: the server closed the connection after refusing a body still being sent.
EXPECTED_STATUSES = {
    "slow headers": {"408"}, "slow body": {"408"}, "9 MB body (over the limit)": {"413", "None"},
    # Refused for load before any parsing while the slow readers hold the slots, else for its size.
    "10k schedule list": {"400", "429"}, "10k schedule in the model name": {"400", "429"},
}  # fmt: skip


async def measure_hostile() -> dict[str, Any]:
    figures: dict[str, Any] = {"machine": machine()}
    options = ("--max-concurrent-requests", str(HOSTILE_SLOTS), "--deadline", str(HOSTILE_DEADLINE_S),
               "--header-timeout", str(HOSTILE_TIMEOUT_S), "--body-timeout", str(HOSTILE_BODY_TIMEOUT_S),
               "--write-timeout", str(HOSTILE_TIMEOUT_S))  # fmt: skip
    with (
        fast_backend("--completion-tokens", LONG_ANSWER_TOKENS, "--chunk-tokens", 2000) as backend,
        serve(backend.url, *options) as (url, process),
    ):
        figures["rss_before_mb"] = round(resident_mb(url), 1)
        bodies = hostile_bodies()
        probe = HealthProbe(url)
        probe.start()
        started = time.monotonic()
        result = await attack(url, bodies)
        figures["attack_s"] = round(time.monotonic() - started, 1)
        probe.stop.set()
        probe.join()
        figures["rss_after_mb"] = round(resident_mb(url), 1)
        figures["clients_cut"] = cut_counts(url)
        figures["slots_held_at_end"] = httpx.get(f"{url}/health").json()["running"]
        process.send_signal(signal.SIGTERM)
        figures["exit_code"] = process.wait(timeout=30)
    rows = []
    unexpected = 0
    for name, results in result["refusals"].items():
        statuses = Counter(str(status) for status, _ in results)
        expected = EXPECTED_STATUSES.get(name, {"400"})
        unexpected += sum(n for status, n in statuses.items() if status not in expected)
        seconds = [s for _, s in results]
        rows.append({"attack": name, "requests": len(results), "statuses": dict(statuses),
                     "refused_p50_s": round(quantile(seconds, 0.5), 3), "refused_max_s": round(max(seconds), 3)})  # fmt: skip
    figures["attacks"] = rows
    figures["unexpected"] = unexpected
    figures["slow_readers"] = SLOW_READERS
    figures["ordinary_first_answer_s"] = round(min(result["ordinary_waited_s"]), 1)
    figures["ordinary_last_answer_s"] = round(max(result["ordinary_waited_s"]), 1)
    latencies = probe.latencies
    figures["health_probes"] = len(latencies)
    figures["health_p50_ms"] = round(1000 * quantile(latencies, 0.5), 1)
    figures["health_p90_ms"] = round(1000 * quantile(latencies, 0.9), 1)
    figures["health_max_ms"] = round(1000 * max(latencies), 1)
    figures["ordinary"] = dict(result["ordinary"])
    figures["ordinary_ok_share"] = result["ordinary"]["ok"] / ORDINARY
    figures["targets"] = check_targets(figures, HOSTILE_TARGETS)
    return figures


def hostile_report(figures: dict[str, Any]) -> list[str]:
    m = figures["machine"]
    return [
        f"Hostile soak of `pacore serve` ({HOSTILE_SLOTS} request slots, `--header-timeout` and `--write-timeout` "
        f"{HOSTILE_TIMEOUT_S:g} s, `--body-timeout {HOSTILE_BODY_TIMEOUT_S:g}`, `--deadline {HOSTILE_DEADLINE_S}`), "
        "attacking in two phases on "
        f"loopback, {figures['attack_s']} s; {m['date']}, {m['cores']} cores, load average {m['load_average_1m']}.",
        "",
        "| attack | requests | statuses | time to refuse (p50) | time to refuse (max) |",
        "|---|---|---|---|---|",
        *(
            f"| {r['attack']} | {r['requests']} | {', '.join(f'{k}: {v}' for k, v in r['statuses'].items())} | "
            f"{r['refused_p50_s']} s | {r['refused_max_s']} s |"
            for r in figures["attacks"]
        ),  # fmt: skip
        f"| streams never read | {figures['slow_readers']} | 200, then dropped; 429 beyond the slots | - | - |",
        "",
        f"- `/health` during the attack ({figures['health_probes']} probes): p50 {figures['health_p50_ms']} ms, "
        f"p90 {figures['health_p90_ms']} ms, max {figures['health_max_ms']} ms.",
        "- Clients the server cut (`pacore_clients_cut_total`): "
        + ", ".join(f"{k} {v}" for k, v in sorted(figures["clients_cut"].items()))
        + ".",
        f"- Ordinary requests sent while the streams nobody reads held every slot ({ORDINARY}, retrying 429s): "
        + ", ".join(f"{k} {v}" for k, v in figures["ordinary"].items())
        + f"; the first answered after {figures['ordinary_first_answer_s']} s, the last after "
        f"{figures['ordinary_last_answer_s']} s; request slots still held at the end: {figures['slots_held_at_end']}.",
        "- A stream nobody reads is cut once the socket buffers (the kernel's, then the server's 64 KB) are full "
        "and nothing moved for `--write-timeout`; the answers here are 2M tokens, so filling them takes most of "
        "the wait above. `--deadline` bounds it in any case.",
        f"- Server RSS: {figures['rss_before_mb']} MB before, {figures['rss_after_mb']} MB after (the viewer's "
        "history keeps those long answers, up to `--history-bytes`, 64 MiB); "
        f"exit code after SIGTERM: {figures['exit_code']}.",
        "",
        "Targets:",
        "",
        "```text",
        *target_lines(figures["targets"]),
        "```",
    ]


def write_hostile(lines: list[str]) -> Path:
    path = BENCH_DIR / "RELIABILITY.md"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start, end = HOSTILE_SECTION
    if start in text:
        text = text[: text.index(start)].rstrip("\n") + "\n"
    section = [start, "", "## Hostile clients against `pacore serve`", "", *lines, "",
               "Reproduce: `.venv/bin/python bench/soak_server.py --hostile --write` (about a minute).", end]  # fmt: skip
    path.write_text(text + "\n" + "\n".join(section) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 bursts (under a minute)")
    parser.add_argument("--bursts", type=int, default=None, help="bursts to run (default 30, --quick 3)")
    parser.add_argument("--hostile", action="store_true", help="attack the server instead (about a minute)")
    parser.add_argument("--write", action="store_true", help="with --hostile: write bench/RELIABILITY.md's section")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args(argv)
    if args.hostile:
        figures = asyncio.run(measure_hostile())
        lines = hostile_report(figures)
        emit(figures, args.json, lines)
        if args.write:
            write_hostile(lines)
        return
    bursts = args.bursts or (3 if args.quick else 30)
    figures = asyncio.run(measure(bursts))
    emit(figures, args.json, report(figures))


if __name__ == "__main__":
    main()
