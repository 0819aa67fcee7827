"""Helpers shared by the bench scripts: fast backends, clocks, figures, output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
STARTUP_TIMEOUT_S = 30.0


@dataclass
class FastBackend:
    """A running ``bench/fastbackend.py`` process and its endpoints' base URLs."""

    process: subprocess.Popen[str]
    urls: list[str]

    @property
    def url(self) -> str:
        return self.urls[0]

    def stats(self) -> list[dict[str, int]]:
        """Each endpoint's counters (calls, samples, active, peak_active)."""
        import httpx

        return [httpx.get(url.removesuffix("/v1") + "/stats").json() for url in self.urls]


@contextlib.contextmanager
def fast_backend(*args: str | int | float) -> Iterator[FastBackend]:
    """Run ``bench/fastbackend.py`` with ``args`` in its own process while the block runs."""
    command = [sys.executable, str(BENCH_DIR / "fastbackend.py"), *map(str, args)]
    # Popen as a context manager closes the stdout pipe at the end (else a ResourceWarning) once the process is reaped.
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            urls: list[str] = []
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            assert process.stdout is not None
            while time.monotonic() < deadline:
                line = process.stdout.readline().strip()
                if line == "ready":
                    break
                if not line and process.poll() is not None:
                    raise RuntimeError(f"fastbackend exited with code {process.returncode}")
                if line.startswith("http"):
                    urls.append(line)
            else:
                raise RuntimeError("fastbackend did not start in time")
            yield FastBackend(process, urls)
        finally:
            stop_process(process)


class Clock:
    """Wall and process CPU time of a block (``with Clock() as clock: ...``)."""

    def __enter__(self) -> Clock:
        self.wall = self.cpu = 0.0
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Send ``sig`` to ``process`` and reap it, killing it if it has not ended within ``timeout`` seconds."""
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) process ``pid`` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: The section of bench/RELIABILITY.md that ``soak_server.py --hostile --write`` owns (reliability.py keeps it).
HOSTILE_SECTION = ("<!-- hostile-soak -->", "<!-- /hostile-soak -->")


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def emit(figures: dict[str, Any], as_json: bool, lines: Sequence[str]) -> None:
    """Print ONE JSON object (``--json``) or the human-readable lines."""
    if as_json:
        print(json.dumps(figures, indent=None, sort_keys=False))
    else:
        print("\n".join(lines))


def check_targets(figures: dict[str, Any], targets: dict[str, tuple[float, bool]]) -> dict[str, Any]:
    """``{key: {measured, goal, met}}`` for ``targets`` of ``key: (target, higher_is_better)``."""
    checked = {}
    for key, (target, higher) in targets.items():
        value = figures[key]
        checked[key] = {
            "measured": value,
            "goal": f"{'>=' if higher else '<='} {target:g}",
            "met": value >= target if higher else value <= target,
        }
    return checked


def target_lines(checked: dict[str, Any]) -> list[str]:
    return [
        f"  {key:26} {t['measured']!s:>8}  target {t['goal']:<9} {'met' if t['met'] else 'NOT met'}"
        for key, t in checked.items()
    ]
