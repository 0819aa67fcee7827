"""Reliability: under injected faults every problem is answered or failed with a reason; none lost, none answered twice.

Each scenario runs ``pacore run`` (the real CLI, in its own process) on a
synthetic data set against ``bench/fastbackend.py`` injecting faults
(``--faults``, see ``bench/faults.py``), optionally SIGKILLs it at seeded random
moments and resumes it, then re-runs it to retry the problems that failed.
After every invocation the run's database is read and checked:

- *lost*: a problem that, once an invocation has ended normally, is neither
  answered nor failed with a reason (pending or missing), or that was at any
  moment recorded failed without a reason;
- *duplicated*: a problem answered more than once: a done row that a later
  invocation changed, or more than one row for a problem;
- a re-run must retry exactly the failed problems and leave done ones alone.

    python bench/reliability.py [--quick] [--kinds K,...] [--json] [--seed N] [--write]

prints the results (``--write``, as ``make bench`` passes, also writes
``bench/RELIABILITY.md``); exits with 1 if anything was lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faults import KINDS
from harness import BENCH_DIR, HOSTILE_SECTION, emit, fast_backend, machine

PACORE = str(Path(sys.executable).parent / "pacore")
ARM = "pacore-2"
#: Seconds each HTTP attempt may take: a ``hang`` fault costs this much.
CALL_TIMEOUT_S = 1.0
RATE = 0.2
# Reruns after the run (at least one), each retrying what failed, until nothing fails.
MAX_RERUNS = 6
# The most each invocation may take before the scenario is declared stuck.
INVOCATION_TIMEOUT_S = 300

Row = tuple[str, str, int, str | None]  # status, updated_at, attempts, error


@dataclass(frozen=True)
class Scenario:
    name: str
    #: ``--faults`` spec of the fast backend.
    faults: str
    problems: int
    kills: int = 0
    #: ``--retries`` of ``pacore run``; ``None``: the default policy.
    retries: int | None = None
    #: Add an endpoint where nothing listens (the router must route around it).
    dead_endpoint: bool = False


@dataclass
class Figures:
    """What a scenario did and found; ``lost`` and ``duplicated`` must stay 0."""

    scenario: str
    faults: str
    problems: int
    kills: int = 0
    retries: int | None = None
    requests: int = 0
    injected: dict[str, int] = field(default_factory=dict)
    #: Every failure recorded along the way (killed invocations included), by reason.
    failures: dict[str, int] = field(default_factory=dict)
    #: Problems failed when the run itself ended (after its kills and resumes), before the reruns.
    run_failed: int = 0
    reruns: int = 0
    #: Problems the reruns retried; each must have failed before.
    retried: int = 0
    #: Failed problems a rerun did not retry (must be 0).
    not_retried: int = 0
    answered: int = 0
    failed: int = 0
    failed_reasons: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    duplicated: int = 0
    tracebacks: int = 0
    seconds: float = 0.0


def scenarios(quick: bool, kinds: list[str] | None = None) -> list[Scenario]:
    """Every kind's scenario, the dead endpoint's, then all kinds mixed with SIGKILLs; ``kinds``: only those."""
    per_kind = 20 if quick else 60
    rows = [Scenario(kind, f"{kind}:{RATE}", per_kind) for kind in kinds or KINDS]
    if kinds is None or "down" in kinds:
        rows.append(Scenario("endpoint down", "", per_kind, dead_endpoint=True))
    mixed = 60 if quick else 200
    kills = 3 if quick else 6
    if kinds is None:
        rows.append(Scenario("all kinds + SIGKILL", f"all:{RATE}", mixed, kills=kills, retries=1))
    else:
        mix = ",".join(f"{kind}:{RATE / len(kinds):g}" for kind in kinds)
        rows.append(Scenario(f"{', '.join(kinds)} + SIGKILL", mix, mixed, kills=kills, retries=1))
    return rows


def fault_kinds(text: str) -> list[str]:
    """``--kinds``: known fault kinds, comma-separated."""
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"fault kinds are among {', '.join(KINDS)}; got {text!r}")
    return list(dict.fromkeys(kinds))


def write_data(path: Path, problems: int) -> Path:
    with path.open("w") as out:
        for i in range(problems):
            out.write(json.dumps({"id": f"p{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n")
    return path


def rows_of(run_dir: Path) -> dict[str, list[Row]]:
    """Every results row of the arm, by problem (a list, so duplicate rows would show)."""
    path = run_dir / "run.sqlite"
    if not path.exists():
        return {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        try:
            found = db.execute(
                "SELECT problem_id, status, updated_at, attempts, error FROM results WHERE arm = ?", (ARM,)
            ).fetchall()
        except sqlite3.OperationalError:  # the run has not created its tables yet
            return {}
    rows: dict[str, list[Row]] = {}
    for problem, *row in found:
        rows.setdefault(problem, []).append(tuple(row))  # type: ignore[arg-type]
    return rows


def finished(run_dir: Path) -> int:
    try:
        return sum(1 for rows in rows_of(run_dir).values() if rows[0][0] != "pending")
    except sqlite3.DatabaseError:
        return 0


def reason(error: str | None) -> str:
    """A failure reason without what varies between problems (ports, counts)."""
    text = re.sub(r"https?://\S+?/v1", "URL", error or "")
    return re.sub(r"(?<!HTTP )\b\d+\b", "N", text)  # HTTP statuses stay


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


class Checker:
    """Follows a run directory across invocations and counts what was lost or duplicated."""

    def __init__(self, run_dir: Path, problems: int, figures: Figures) -> None:
        self.run_dir = run_dir
        self.ids = {f"p{i}" for i in range(problems)}
        self.figures = figures
        self.done: dict[str, Row] = {}
        self.duplicated: set[str] = set()
        self.unexplained: set[str] = set()
        #: ``(problem, attempts)`` of each failure record -> its reason.
        self.failures: dict[tuple[str, int], str] = {}

    def after(self, completed: bool) -> dict[str, list[Row]]:
        """Check the store after an invocation (``completed``: it ended normally, not killed)."""
        rows = rows_of(self.run_dir)
        for problem, found in rows.items():
            status, _, attempts, error = row = found[0]
            earlier = self.done.get(problem)
            if len(found) > 1 or (earlier is not None and row != earlier):
                self.duplicated.add(problem)
            elif status == "done":
                self.done[problem] = row
            elif status == "failed":
                self.failures[(problem, attempts)] = reason(error)
                if not error:
                    self.unexplained.add(problem)
        lost = set(self.unexplained)
        if completed:
            lost |= {p for p in self.ids if p not in rows or rows[p][0][0] == "pending"}
        self.figures.lost = max(self.figures.lost, len(lost))
        self.figures.duplicated = len(self.duplicated)
        self.figures.failures = dict(Counter(self.failures.values()))
        return rows


def run_scenario(scenario: Scenario, workdir: Path, seed: int) -> Figures:
    """Run one scenario in ``workdir``; its run directory is ``workdir / "run"``."""
    started = time.perf_counter()
    figures = Figures(scenario.name, scenario.faults or "-", scenario.problems, scenario.kills, scenario.retries)
    data = write_data(workdir / "data.jsonl", scenario.problems)
    run_dir = workdir / "run"
    server_args: list[Any] = ["--ttft-ms", 20, "--completion-tokens", 6, "--fault-seed", seed]
    if scenario.faults:
        server_args += ["--faults", scenario.faults]
    with fast_backend(*server_args) as server:
        backends = [closed_port_url()] if scenario.dead_endpoint else []
        backends.append(server.url)
        command = run_command(data, run_dir, backends, scenario.retries)
        checker = Checker(run_dir, scenario.problems, figures)
        log = workdir / "stderr.log"
        rng = random.Random(f"reliability:{seed}:{scenario.name}")
        low, high = scenario.problems // 10, scenario.problems * 9 // 10
        targets = sorted(rng.sample(range(low, high), scenario.kills)) if scenario.kills else []
        for target in targets:
            kill_when(command, log, run_dir, target, rng.uniform(0, 0.15))
            checker.after(completed=False)
        _invoke(command, log)
        rows = checker.after(completed=True)
        failed = {p for p, found in rows.items() if found[0][0] == "failed"}
        figures.run_failed = len(failed)
        # At least one rerun, even with nothing to retry: it must leave every done problem alone.
        while figures.reruns == 0 or (failed and figures.reruns < MAX_RERUNS):
            before = rows
            _invoke(command, log)
            figures.reruns += 1
            rows = checker.after(completed=True)
            retried = {p for p in rows if rows[p][0][2] != before[p][0][2]}
            figures.retried += len(retried)
            checker.duplicated |= retried - failed  # a rerun touched a problem that had not failed
            figures.not_retried += len(failed - retried)
            figures.duplicated = len(checker.duplicated)
            failed = {p for p, found in rows.items() if found[0][0] == "failed"}
        stats = server.stats()[0]
    # Nothing listens at a dead endpoint to count its requests: the traces record each one.
    dead = _failed_attempts(run_dir)["connect"] if scenario.dead_endpoint else 0
    figures.injected = {"endpoint down (connect failures seen)": dead} if scenario.dead_endpoint else stats["faults"]
    figures.requests = stats["calls"] + sum(stats["faults"].values()) + dead
    figures.answered = sum(1 for found in rows.values() if found[0][0] == "done")
    figures.failed_reasons = dict(Counter(reason(found[0][3]) for found in rows.values() if found[0][0] == "failed"))
    figures.failed = sum(figures.failed_reasons.values())
    figures.tracebacks = log.read_text().count("Traceback")
    figures.seconds = round(time.perf_counter() - started, 1)
    return figures


def run_command(data: Path, run_dir: Path, backends: list[str], retries: int | None, *extra: str) -> list[str]:
    """The ``pacore run`` command line of a scenario."""
    return [
        PACORE, "run", str(data), "--out", str(run_dir), "--schedule", "2", "--concurrency", "8",
        "--model", "fast", "--max-tokens", "6", "--timeout", str(CALL_TIMEOUT_S),
        *(arg for url in backends for arg in ("--backend", url)),
        *(["--retries", str(retries)] if retries is not None else []), *extra,
    ]  # fmt: skip


def environment() -> dict[str, str]:
    """This process's environment without API keys or debugging switches."""
    return {k: v for k, v in os.environ.items() if k not in ("PACORE_API_KEY", "OPENAI_API_KEY", "PACORE_DEBUG")}


def _invoke(command: list[str], log: Path) -> None:
    """Run ``pacore run`` to its end (exit 0: all answered, 1: some failed)."""
    with log.open("a") as err:
        code = subprocess.run(
            command, stdout=subprocess.DEVNULL, stderr=err, env=environment(), timeout=INVOCATION_TIMEOUT_S
        ).returncode
    if code not in (0, 1):
        raise RuntimeError(f"pacore run exited with {code}; see {log}")


def kill_when(
    command: list[str], log: Path, run_dir: Path, target: int, extra_s: float, env: dict[str, str] | None = None
) -> None:
    """Start ``pacore run`` and SIGKILL it ``extra_s`` after ``target`` problems have finished."""
    with log.open("a") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env or environment())
    try:
        deadline = time.monotonic() + INVOCATION_TIMEOUT_S
        while process.poll() is None and finished(run_dir) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(extra_s)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def _failed_attempts(run_dir: Path) -> Counter[str]:
    """Kinds of the failed attempts the traces record (retried, failed over or final)."""
    kinds: Counter[str] = Counter()
    with sqlite3.connect(f"file:{run_dir / 'run.sqlite'}?mode=ro", uri=True) as db:
        for (trace,) in db.execute("SELECT trace_json FROM results WHERE trace_json IS NOT NULL"):
            for rnd in json.loads(trace)["rounds"]:
                for t in rnd["trajectories"]:
                    kinds.update(label.split()[0] for label in t.get("failed_attempts", ()))
                    if t.get("error_kind"):
                        kinds[t["error_kind"]] += 1
    return kinds


def measure(quick: bool, seed: int, kinds: list[str] | None = None) -> dict[str, Any]:
    rows = []
    for scenario in scenarios(quick, kinds):
        with tempfile.TemporaryDirectory(prefix="pacore-reliability-") as workdir:
            figures = run_scenario(scenario, Path(workdir), seed)
        print(f"  {scenario.name}: {_row_summary(figures)}", file=sys.stderr, flush=True)
        rows.append(figures.__dict__)
    totals = {key: sum(row[key] for row in rows) for key in ("requests", "answered", "failed", "lost", "duplicated")}
    totals["injected"] = sum(sum(row["injected"].values()) for row in rows)
    totals["problems"] = sum(row["problems"] for row in rows)
    return {"machine": machine(), "quick": quick, "seed": seed, "rate": RATE, "rows": rows, "totals": totals}


def _row_summary(row: Figures) -> str:
    return (
        f"{row.answered}/{row.problems} answered, {row.failed} failed, {row.lost} lost, {row.duplicated} duplicated "
        f"({sum(row.injected.values())} faults in {row.requests} requests, {row.seconds}s)"
    )


def report(figures: dict[str, Any]) -> list[str]:
    rows = figures["rows"]
    lines = [
        "| scenario | faults | problems | SIGKILLs | faults injected (by kind) | requests "
        "| problem failures recorded | failed when the run ended | reruns retried | answered "
        "| failed at the end | lost | duplicated |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        injected = ", ".join(f"{kind} {count}" for kind, count in sorted(row["injected"].items())) or "0"
        lines.append(
            f"| {row['scenario']} | `{row['faults']}` | {row['problems']} | {row['kills']} | {injected} | "
            f"{row['requests']} | {sum(row['failures'].values())} | "
            f"{row['run_failed']} | {row['retried']} in {row['reruns']} | {row['answered']} | {row['failed']} | "
            f"**{row['lost']}** | **{row['duplicated']}** |"
        )
    totals = figures["totals"]
    lines += [
        "",
        f"Totals: {totals['problems']} problems, {totals['requests']} requests, {totals['injected']} faults injected; "
        f"{totals['answered']} answered, {totals['failed']} failed, **{totals['lost']} lost, "
        f"{totals['duplicated']} duplicated**.",
    ]
    for row in rows:
        if row["failures"]:
            lines += ["", f'Problem failures recorded in "{row["scenario"]}", by reason (ports and counts as N):', ""]
            ranked = sorted(row["failures"].items(), key=lambda item: -item[1])
            lines += [f"- {count} x `{text}`" for text, count in ranked]
    return lines


def write_markdown(figures: dict[str, Any]) -> Path:
    flag = " --quick" if figures["quick"] else ""
    m = figures["machine"]
    lines = [
        "# Reliability under injected faults",
        "",
        f"Generated by `.venv/bin/python bench/reliability.py{flag}` on {m['date']} "
        f"({m['cores']} cores, Python {m['python']}, seed {figures['seed']}).",
        "",
        (__doc__ or "").split("\n\n", 1)[1].split("\n\n    python")[0].strip(),
        "",
        "Settings: schedule 2 (3 trajectories a problem, in 2 calls since the server honours `n`), "
        f"8 problems at once, `--timeout {CALL_TIMEOUT_S:g}` "
        f"(a hang costs that), 20 ms to first token; each fault kind alone at rate {RATE:g} "
        '(`KIND:0.2`) with the default retry policy (4 attempts); "endpoint down": a second `--backend` '
        "where nothing listens, so the router's circuit breaker and failover must route around it; "
        f'"all kinds + SIGKILL": every kind at once (`all:{RATE:g}`), `--retries 1` so that some problems '
        "fail, the run SIGKILLed at seeded random moments and resumed each time. Each run is then re-run "
        f"(up to {MAX_RERUNS} times) until nothing fails; *reruns retried* counts the problems those re-runs "
        "retried: only failed ones may be.",
        "",
        "Fault kinds (`bench/faults.py`):",
        "",
        *(f"- `{kind}`: {what}" for kind, what in KINDS.items()),
        "",
        "## Results",
        "",
        *report(figures),
        "",
        "Reproduce: `.venv/bin/python bench/reliability.py --write` (about 80 s on 2 cores; `--quick`: under 40 s; "
        "`--json` for one JSON object; without `--write` it only prints).",
    ]
    path = BENCH_DIR / "RELIABILITY.md"
    # The hostile-client section belongs to bench/soak_server.py --hostile: kept as it is.
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    kept = old[old.index(HOSTILE_SECTION[0]) :] if HOSTILE_SECTION[0] in old else ""
    path.write_text("\n".join(lines) + "\n" + (f"\n{kept}" if kept else ""), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer problems per scenario (under a minute)")
    parser.add_argument(
        "--kinds", type=fault_kinds, metavar="K,...", help="only these fault kinds' scenarios (not with --write)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seed", type=int, default=1, help="seed of the faults and of the kill moments")
    parser.add_argument("--write", action="store_true", help="also write bench/RELIABILITY.md (make bench does)")
    args = parser.parse_args(argv)
    if args.write and args.kinds:
        parser.error("--write records every scenario: drop --kinds")  # a partial table would replace the full one
    figures = measure(args.quick, args.seed, args.kinds)
    outcome = f"wrote {write_markdown(figures)}" if args.write else "bench/RELIABILITY.md not written (--write does)"
    emit(figures, args.json, [*report(figures), "", outcome])
    totals = figures["totals"]
    broken = any(row["tracebacks"] or row["not_retried"] for row in figures["rows"])
    if totals["lost"] or totals["duplicated"] or broken:
        raise SystemExit("reliability: problems were lost, duplicated or not retried, or a traceback was printed")


if __name__ == "__main__":
    main()
