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

    python bench/soak_server.py [--quick] [--json] [--bursts N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from harness import check_targets, emit, fast_backend, machine, target_lines

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
def serve(backend_url: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """The real ``pacore serve`` in its own process; yields its base URL and the process."""
    process = subprocess.Popen(
        [str(PACORE), "serve", "--port", "0", "--backend", backend_url, "--model", "fast", "--schedule", "2",
         "--max-concurrent-requests", str(CONCURRENCY), "--max-body-bytes", str(MAX_BODY_BYTES),
         "--grace-period", "5", "--deadline", str(DEADLINE_S)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        found = re.search(r"listening on (http://\S+)", process.stdout.readline())
        if found is None:
            raise RuntimeError(f"pacore serve did not start: {process.stderr.read() if process.stderr else ''}")
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
        request |= {"content": json.dumps({"model": "m", "messages": messages}), "headers": {"Content-Type": "text/plain"}}
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
        expected = sum(1 for k, (outcome, _) in zip(kinds, results) if k == kind and outcome == f"error_{status}")
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 bursts (under a minute)")
    parser.add_argument("--bursts", type=int, default=None, help="bursts to run (default 30, --quick 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args(argv)
    bursts = args.bursts or (3 if args.quick else 30)
    figures = asyncio.run(measure(bursts))
    emit(figures, args.json, report(figures))


if __name__ == "__main__":
    main()
