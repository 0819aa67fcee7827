"""What ``pacore serve`` costs in front of a model server.

A fast backend (``bench/fastbackend.py``) is called directly and through
``pacore serve`` (its own process) in pass-through mode (model
``pacore-1/fast``: one backend call per request) and in PaCoRe mode
(``pacore-4/fast``: 4 + 1 calls). Measured on loopback, with the client,
the server and the backend sharing this machine's cores:

- added latency: a zero-latency backend called one request at a time,
  pass-through minus direct, p50 and p99 (direct and pass-through requests
  take turns, so both see the same load);
- time to first streamed chunk: a backend with 100 ms to first token; in
  PaCoRe mode the server sends its first chunk before any backend call ends;
- requests/s with 200 concurrent clients (each its own connection, a fixed
  number of requests each);
- the server's CPU per streamed token it relays (pass-through streams), from
  a backend that streams (as pacore's calls ask) and from one answering plain
  JSON: what streaming the backend calls costs per token.

    python bench/proxy.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from harness import check_targets, emit, fast_backend, machine, percentile, process_cpu_s, stop_process, target_lines

MESSAGES = [{"role": "user", "content": "How many primes are there below 100? Answer with the number."}]
COMPLETION_TOKENS = 32
STREAM_TTFT_MS = 100
CLIENTS = 200
PACORE = Path(sys.executable).parent / "pacore"
STARTUP_TIMEOUT_S = 60.0

TARGETS = {"passthrough_added_p50_ms": (2.0, False), "pacore_first_chunk_p50_ms": (50.0, False)}


@dataclass
class Server:
    url: str  # .../v1
    pid: int

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far (Linux /proc)."""
        return process_cpu_s(self.pid)


@contextlib.contextmanager
def pacore_serve(backend_url: str) -> Iterator[Server]:
    """``pacore serve`` on a free port in front of ``backend_url``."""
    command = [
        str(PACORE), "serve", "--port", "0", "--backend", backend_url, "--model", "fast",
        "--max-concurrent-requests", "1000", "--history", "0", "--max-tokens", str(COMPLETION_TOKENS),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            raise RuntimeError(f"pacore serve did not start: {line!r}")
        yield Server(match.group(1).rstrip("/") + "/v1", process.pid)
    finally:
        stop_process(process, signal.SIGINT, timeout=20)


def body(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "max_tokens": COMPLETION_TOKENS, "stream": stream}


async def latencies(*targets: tuple[str, str], count: int) -> list[list[float]]:
    """Milliseconds per request to each ``(url, model)`` target, one request at a time.

    Each target has its own kept-alive connection, and the targets take turns
    request by request (in alternating order), so a change in the machine's
    load during the run falls on all of them alike.
    """
    out: list[list[float]] = [[] for _ in targets]
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(timeout=60)) for _ in targets]
        turns = list(zip(clients, targets, out, strict=True))
        for i in range(count + 5):
            for client, (url, model), times in turns if i % 2 else reversed(turns):
                started = time.perf_counter()
                response = await client.post(url + "/chat/completions", json=body(model))
                response.raise_for_status()
                if i >= 5:  # the first ones open the connections
                    times.append((time.perf_counter() - started) * 1000)
    return out


async def first_chunks(url: str, model: str, count: int) -> list[float]:
    """Milliseconds from sending a streamed request to its first ``data:`` line."""
    out = []
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(count + 2):
            started = time.perf_counter()
            async with client.stream("POST", url + "/chat/completions", json=body(model, stream=True)) as response:
                response.raise_for_status()
                first = None
                async for line in response.aiter_lines():  # read to the end: the connection is reused
                    if first is None and line.startswith("data:"):
                        first = time.perf_counter() - started
            if i >= 2 and first is not None:
                out.append(first * 1000)
    return out


async def requests_per_s(url: str, model: str, per_client: int) -> float:
    """Requests/s with CLIENTS concurrent clients, each with its own connection."""
    payload = json.dumps(body(model)).encode()
    headers = {"Content-Type": "application/json"}
    clients = [httpx.AsyncClient(timeout=120) for _ in range(CLIENTS)]

    async def client_loop(client: httpx.AsyncClient) -> None:
        for _ in range(per_client):
            (await client.post(url + "/chat/completions", content=payload, headers=headers)).raise_for_status()

    try:
        await asyncio.gather(*(client_loop(c) for c in clients[:20]))  # warm up
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in clients))
        return CLIENTS * per_client / (time.perf_counter() - started)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


async def relay_cpu_us_per_token(server: Server, clients: int, per_client: int) -> float:
    """Server CPU per token relayed, pass-through, ``clients`` streams at once.

    Each answer is ``COMPLETION_TOKENS`` tokens (the fast backend's, capped by ``max_tokens``).
    """
    payload = json.dumps(body("pacore-1/fast", stream=True)).encode()
    tokens = 0

    async def client_loop() -> None:
        nonlocal tokens
        async with httpx.AsyncClient(timeout=120) as client:
            for _ in range(per_client):
                async with client.stream("POST", server.url + "/chat/completions", content=payload) as response:
                    async for _ in response.aiter_lines():
                        pass
                tokens += COMPLETION_TOKENS

    before = server.cpu_s()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return (server.cpu_s() - before) / tokens * 1e6


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(values, 50), 2), "p99_ms": round(percentile(values, 99), 2)}


async def measure(quick: bool) -> dict[str, Any]:
    count = 100 if quick else 1000
    per_client = 2 if quick else 6
    figures: dict[str, Any] = {"machine": machine()}
    with fast_backend("--completion-tokens", COMPLETION_TOKENS) as backend, pacore_serve(backend.url) as served:
        server = served.url
        direct, passthrough = await latencies((backend.url, "fast"), (server, "pacore-1/fast"), count=count)
        [pacore] = await latencies((server, "pacore-4/fast"), count=count // 4)
        figures["latency_direct"] = summary(direct)
        figures["latency_passthrough"] = summary(passthrough)
        figures["latency_pacore_4"] = summary(pacore)
        figures["passthrough_added_p50_ms"] = round(percentile(passthrough, 50) - percentile(direct, 50), 2)
        figures["passthrough_added_p99_ms"] = round(percentile(passthrough, 99) - percentile(direct, 99), 2)
        rates = {
            "direct": await requests_per_s(backend.url, "fast", per_client),
            "passthrough": await requests_per_s(server, "pacore-1/fast", per_client),
            "pacore_4": await requests_per_s(server, "pacore-4/fast", max(1, per_client // 2)),
        }
        figures["requests_per_s_200_clients"] = {k: round(v, 1) for k, v in rates.items()}
        figures["server_cpu_us_per_streamed_token"] = round(
            await relay_cpu_us_per_token(served, 50, 2 if quick else 6), 1
        )
    # The same relay from a backend that answers plain JSON: what streaming the backend calls costs.
    plain = ("--completion-tokens", COMPLETION_TOKENS, "--stream-support", "ignore")
    with fast_backend(*plain) as backend, pacore_serve(backend.url) as served:
        figures["server_cpu_us_per_token_plain_backend"] = round(
            await relay_cpu_us_per_token(served, 50, 2 if quick else 6), 1
        )
    streaming = ("--completion-tokens", COMPLETION_TOKENS, "--ttft-ms", STREAM_TTFT_MS, "--tokens-per-s", 500)
    with fast_backend(*streaming) as backend, pacore_serve(backend.url) as served:
        server = served.url
        count = 20 if quick else 60
        figures["first_chunk_direct"] = summary(await first_chunks(backend.url, "fast", count))
        figures["first_chunk_passthrough"] = summary(await first_chunks(server, "pacore-1/fast", count))
        pacore_first = await first_chunks(server, "pacore-4/fast", count)
        figures["first_chunk_pacore_4"] = summary(pacore_first)
        figures["pacore_first_chunk_p50_ms"] = round(percentile(pacore_first, 50), 2)
    figures["targets"] = check_targets(figures, TARGETS)
    return figures


def report(figures: dict[str, Any]) -> list[str]:
    lines = [
        f"pacore serve in front of a fast backend; client, server and backend share "
        f"{figures['machine']['cores']} cores.",
        "latency, zero-latency backend, one request at a time (p50 / p99 ms):",
    ]
    for key in ("direct", "passthrough", "pacore_4"):
        f = figures[f"latency_{key}"]
        lines.append(f"  {key:12} {f['p50_ms']:7.2f} / {f['p99_ms']:7.2f}")
    lines.append(
        f"  pass-through adds {figures['passthrough_added_p50_ms']:.2f} ms p50, "
        f"{figures['passthrough_added_p99_ms']:.2f} ms p99"
    )
    lines.append(f"first streamed chunk, backend with {STREAM_TTFT_MS} ms to first token (p50 / p99 ms):")
    for key in ("direct", "passthrough", "pacore_4"):
        f = figures[f"first_chunk_{key}"]
        lines.append(f"  {key:12} {f['p50_ms']:7.2f} / {f['p99_ms']:7.2f}")
    lines.append(f"requests/s with {CLIENTS} concurrent clients:")
    for key, value in figures["requests_per_s_200_clients"].items():
        lines.append(f"  {key:12} {value:8.1f}")
    lines.append(
        f"server CPU per token relayed (pass-through, 50 client streams at once): "
        f"{figures['server_cpu_us_per_streamed_token']} us from a streaming backend, "
        f"{figures['server_cpu_us_per_token_plain_backend']} us from one answering plain JSON"
    )
    return [*lines, "targets:", *target_lines(figures["targets"])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (under a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args(argv)
    figures = asyncio.run(measure(args.quick))
    emit(figures, args.json, report(figures))


if __name__ == "__main__":
    main()
