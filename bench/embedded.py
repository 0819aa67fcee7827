"""Does pacore keep the embedded model busy? Wall time against generation time.

Runs ``[4]`` requests (4 trajectories, then 1 synthesis call) on the embedded
Gemma 3 270M and compares each request's wall time with the time the model
itself spent generating for the same calls (``LlamaCppBackend.busy_s``: from
prompt formatting to the last token, summed over calls). The model is
loaded and warmed up first; loading is not part of either figure. The
model runs on PACORE_THREADS threads (default 1, see bench/threads.py); the
event loop shares the cores.

    python bench/embedded.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from harness import Clock, check_targets, emit, machine, target_lines
from pacore import GenerationParams, asolve
from pacore.backends.llama_cpp import LlamaCppBackend

PROBLEM = "A farmer has 17 sheep. All but 9 run away. How many sheep does the farmer have left?"
TARGET = 1.05


async def measure(quick: bool) -> dict[str, Any]:
    requests = 1 if quick else 3
    params = GenerationParams(max_tokens=24 if quick else 48)
    backend = LlamaCppBackend()
    await backend.generate([{"role": "user", "content": "Hello"}], 1, GenerationParams(max_tokens=4))
    ratios, walls, busies, tokens = [], [], [], 0
    for i in range(requests):
        backend.busy_s = 0.0
        with Clock() as clock:
            result = await asolve(PROBLEM, schedule=[4], backend=backend, params=params, seed=i)
        walls.append(clock.wall)
        busies.append(backend.busy_s)
        ratios.append(clock.wall / backend.busy_s)
        tokens += result.usage.completion_tokens
    wall, busy = sum(walls), sum(busies)
    figures: dict[str, Any] = {
        "machine": machine(),
        "requests": requests,
        "schedule": [4],
        "max_tokens": params.max_tokens,
        "wall_s": round(wall, 2),
        "generation_s": round(busy, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "wall_over_generation": round(wall / busy, 4),
        "worst_request_wall_over_generation": round(max(ratios), 4),
    }
    figures["targets"] = check_targets(figures, {"wall_over_generation": (TARGET, False)})
    return figures


def report(figures: dict[str, Any]) -> list[str]:
    return [
        f"embedded model, {figures['requests']} requests of schedule [4] "
        f"(max_tokens {figures['max_tokens']}) on {figures['machine']['cores']} cores:",
        f"  wall {figures['wall_s']} s, model generating {figures['generation_s']} s, "
        f"{figures['tokens_per_s']} tokens/s",
        f"  wall / generation {figures['wall_over_generation']} "
        f"(worst request {figures['worst_request_wall_over_generation']})",
        "targets:",
        *target_lines(figures["targets"]),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args(argv)
    figures = asyncio.run(measure(args.quick))
    emit(figures, args.json, report(figures))


if __name__ == "__main__":
    main()
