"""What does starting pacore cost? CPU and wall time of short ``pacore`` commands, beside bare Python's.

Every ``pacore`` command pays the interpreter's start and the imports it needs
before it does anything, and the test suite starts hundreds of them. Each
command below runs in a fresh process (``python -m pacore ...``, which is what
the ``pacore`` script runs), the commands taking turns so that a busy moment
of the machine falls on all of them alike; the figures are the medians over
the runs of each (7, after one uncounted run that compiles the bytecode; 3
with ``--quick``): wall time and CPU time (user + system, the child's own).
Two baselines are measured in the same run: ``python -c pass`` (the
interpreter alone) and ``import pydantic, typer`` (the two libraries the
commands with options cannot do without); "over bare Python" is a command's
CPU minus the first's.

    python bench/startup.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from harness import emit, machine

PACORE = [sys.executable, "-m", "pacore"]
#: What each figure times: the two baselines first.
COMMANDS: dict[str, list[str]] = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import pydantic, typer": [sys.executable, "-c", "import pydantic, typer"],
    "import pacore": [sys.executable, "-c", "import pacore"],
    "pacore --version": [*PACORE, "--version"],
    "pacore --help": [*PACORE, "--help"],
    "pacore ask --help": [*PACORE, "ask", "--help"],
    "pacore data list": [*PACORE, "data", "list"],
}
BASELINE = "python -c pass"
#: What an installed pacore runs with: bytecode compiled once and kept (pip compiles it at install), even where the
#: caller's environment says not to write it (the suite's does): compiling at every start is not what users pay.
ENVIRONMENT = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def timed_run(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``command`` (which must succeed)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENVIRONMENT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(runs: int, warm_up: bool = True) -> dict[str, Any]:
    if warm_up:  # Python writes the bytecode of what it compiles at the first run: not counted
        for command in COMMANDS.values():
            timed_run(command)
    walls: dict[str, list[float]] = {name: [] for name in COMMANDS}
    cpus: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(runs):
        for name, command in COMMANDS.items():
            wall, cpu = timed_run(command)
            walls[name].append(wall)
            cpus[name].append(cpu)
    commands = {
        name: {
            "wall_ms": round(1000 * statistics.median(walls[name]), 1),
            "cpu_ms": round(1000 * statistics.median(cpus[name]), 1),
        }
        for name in COMMANDS
    }
    bare = commands[BASELINE]["cpu_ms"]
    for figures in commands.values():
        figures["cpu_over_bare_python_ms"] = round(figures["cpu_ms"] - bare, 1)
    return {"machine": machine(), "runs": runs, "commands": commands, "targets": {}}


def report(figures: dict[str, Any]) -> list[str]:
    lines = [
        f"median of {figures['runs']} runs each, on {figures['machine']['cores']} cores "
        f"(load average {figures['machine']['load_average_1m']} at the start):",
        f"  {'command':24} {'wall ms':>8} {'CPU ms':>8} {'CPU over bare Python ms':>24}",
    ]
    for name, row in figures["commands"].items():
        lines.append(f"  {name:24} {row['wall_ms']:>8} {row['cpu_ms']:>8} {row['cpu_over_bare_python_ms']:>24}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 runs of each command instead of 7, and no uncounted first run"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args(argv)
    figures = measure(3, warm_up=False) if args.quick else measure(7)
    emit(figures, args.json, report(figures))


if __name__ == "__main__":
    main()
