"""Which llama.cpp thread count suits the embedded model here? Tokens/s and their spread.

Alternates 1, 2, ... threads (interleaved, so a neighbour's load hits every
setting alike), each run a short fixed-length generation of the embedded
Gemma 3 270M after a warm-up, and prints per thread count the median,
min and max tokens/s. pacore's default (``DEFAULT_THREADS``) was chosen
with it; set ``PACORE_THREADS`` or ``--threads`` to override.

    python bench/threads.py [--threads 1,2] [--repeats 5] [--tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from harness import emit, machine
from pacore.backends.base import GenerationParams
from pacore.backends.llama_cpp import LlamaCppBackend

PROMPT = [{"role": "user", "content": "Tell me about the history of the bicycle."}]


async def tokens_per_s(backend: LlamaCppBackend, tokens: int, seed: int) -> float:
    # min_p 0 and a fixed length: every run generates the same number of tokens.
    params = GenerationParams(max_tokens=tokens, seed=seed, temperature=1.0, extra={"min_p": 0.0})
    started = time.perf_counter()
    (completion,) = await backend.generate(PROMPT, 1, params)
    return completion.completion_tokens / (time.perf_counter() - started)


async def measure(thread_counts: list[int], repeats: int, tokens: int) -> dict[str, Any]:
    backends = {n: LlamaCppBackend(threads=n) for n in thread_counts}
    for backend in backends.values():  # load and warm up
        await backend.generate(PROMPT, 1, GenerationParams(max_tokens=4, seed=0))
    rates: dict[int, list[float]] = {n: [] for n in thread_counts}
    for repeat in range(repeats):
        for n, backend in backends.items():
            rates[n].append(await tokens_per_s(backend, tokens, repeat))
    return {
        "machine": machine(),
        "tokens_per_call": tokens,
        "repeats": repeats,
        "threads": {
            str(n): {
                "median_tokens_per_s": round(statistics.median(r), 1),
                "min_tokens_per_s": round(min(r), 1),
                "max_tokens_per_s": round(max(r), 1),
                "runs": [round(x, 1) for x in r],
            }
            for n, r in rates.items()
        },
    }


def report(figures: dict[str, Any]) -> list[str]:
    lines = [f"embedded model, {figures['repeats']} x {figures['tokens_per_call']} tokens per thread count"]
    for n, f in figures["threads"].items():
        lines.append(
            f"  {n} thread(s): median {f['median_tokens_per_s']} tokens/s "
            f"(min {f['min_tokens_per_s']}, max {f['max_tokens_per_s']}; runs {f['runs']})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="thread counts to compare, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    counts = [int(n) for n in args.threads.split(",")]
    figures = asyncio.run(measure(counts, args.repeats, args.tokens))
    emit(figures, args.json, report(figures))


if __name__ == "__main__":
    main()
