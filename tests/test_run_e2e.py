"""``pacore run`` as a user runs it: a real subprocess, killed with SIGKILL and resumed.

Answers come from ``bench/fastbackend.py`` (a real OpenAI-compatible server on
loopback with a fixed latency) or, marked ``model``, from the embedded model.
"""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from cli_harness import PACORE, assert_one_line_error, closed_port_url, environment, pacore, pacore_in_process
from harness import fast_backend
from pacore.cli.run_display import LiveBatchDisplay
from pacore.eval import runner
from pacore.eval.runner import BatchProgress

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_test_1000.jsonl"
PROBLEMS = 20


@pytest.fixture
def fast_server() -> Iterator[str]:
    """A fast OpenAI-compatible server taking 200 ms per call."""
    with fast_backend("--ttft-ms", 200, "--completion-tokens", 6) as backend:
        yield backend.url


def samples_served(url: str) -> int:
    return httpx.get(url.removesuffix("/v1") + "/stats").json()["samples"]


def wait_until_idle(url: str, timeout: float = 60) -> None:
    """Until the server has no call in progress: every call a killed run sent is counted and over."""
    deadline = time.monotonic() + timeout
    while httpx.get(url.removesuffix("/v1") + "/stats").json()["active"]:
        assert time.monotonic() < deadline, f"calls still in progress after {timeout}s"
        time.sleep(0.02)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
            for i in range(PROBLEMS)
        )
    )
    return path


def done_rows(run_dir: Path) -> dict[str, tuple[str, str, int]]:
    """``problem -> (updated_at, trace_json, attempts)`` of every done problem."""
    with sqlite3.connect(run_dir / "run.sqlite") as db:
        rows = db.execute(
            "SELECT problem_id, updated_at, trace_json, attempts FROM results WHERE status = 'done'"
        ).fetchall()
    return {problem: (updated, trace, attempts) for problem, updated, trace, attempts in rows}


def wait_for_done(run_dir: Path, at_least: int, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        if (run_dir / "run.sqlite").exists():
            try:
                if len(done_rows(run_dir)) >= at_least:
                    return
            except sqlite3.OperationalError:
                pass  # the tables do not exist yet
        time.sleep(0.02)
    raise AssertionError(f"fewer than {at_least} problems done after {timeout}s")


def test_sigkill_then_resume_loses_and_repeats_nothing(fast_server: str, data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [
        str(data), "--out", str(run_dir), "--method", "pacore", "--schedule", "2", "--concurrency", "2",
        "--backend", fast_server, "--model", "fast", "--max-tokens", "6",
    ]  # fmt: skip
    process = subprocess.Popen(
        [PACORE, "run", *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(), text=True
    )
    try:
        wait_for_done(run_dir, 3, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    finished_before = done_rows(run_dir)
    assert 3 <= len(finished_before) < PROBLEMS
    wait_until_idle(fast_server)
    served_before = samples_served(fast_server)

    resumed = pacore_in_process("run", *command)  # the resume: what it says, not its process
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming pacore-2 in {run_dir}: {len(finished_before)} done (skipped)" in resumed.stderr
    assert resumed.stdout.startswith(f"pacore-2: {PROBLEMS}/{PROBLEMS} answered")

    finished = done_rows(run_dir)
    assert sorted(finished) == sorted(f"p{i}" for i in range(PROBLEMS))  # no loss
    assert all(attempts == 1 for _, _, attempts in finished.values())  # each answered exactly once
    for problem, row in finished_before.items():
        assert finished[problem] == row  # finished work kept as it was, not redone
    # 2 first-round samples + 1 synthesis per problem, and only for the unfinished ones.
    assert samples_served(fast_server) - served_before == 3 * (PROBLEMS - len(finished_before))

    again = pacore_in_process("run", *command)
    assert again.returncode == 0 and "0 unfinished" in again.stderr
    assert samples_served(fast_server) - served_before == 3 * (PROBLEMS - len(finished_before))


def result_rows(run_dir: Path) -> dict[tuple[str, int, int], tuple[str, str, int]]:
    """``(problem, seed, repeat) -> (status, updated_at, attempts)`` of every result."""
    with sqlite3.connect(run_dir / "run.sqlite") as db:
        rows = db.execute("SELECT problem_id, seed, repeat, status, updated_at, attempts FROM results").fetchall()
    return {(p, seed, repeat): (status, updated, attempts) for p, seed, repeat, status, updated, attempts in rows}


def test_repeats_survive_sigkill_and_a_second_seed_adds_draws(fast_server: str, data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    repeats, problems = 3, 10
    common = [
        str(data), "--out", str(run_dir), "--limit", str(problems), "--schedule", "2", "--pool-size", "4",
        "--concurrency", "2", "--backend", fast_server, "--model", "fast", "--max-tokens", "6",
    ]  # fmt: skip
    command = [*common, "--repeats", str(repeats), "--seed", "1"]
    process = subprocess.Popen(
        [PACORE, "run", *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(), text=True
    )
    try:
        wait_for_done(run_dir, 4, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    before = result_rows(run_dir)
    done_before = {key: row for key, row in before.items() if row[0] == "done"}
    assert 4 <= len(done_before) < repeats * problems
    wait_until_idle(fast_server)
    served_before = samples_served(fast_server)

    resumed = pacore_in_process("run", *command)  # the resume: what it says, not its process
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming pacore-2 in {run_dir}: {len(done_before)} done (skipped)" in resumed.stderr
    assert resumed.stdout.startswith(
        f"pacore-2: {repeats * problems}/{repeats * problems} answered ({problems} problems × 3 repeats)"
    )
    after = result_rows(run_dir)
    assert sorted(after) == sorted((f"p{i}", 1, r) for i in range(problems) for r in range(repeats))
    assert all(status == "done" and attempts == 1 for status, _, attempts in after.values())  # once each
    for key, row in done_before.items():
        assert after[key] == row  # kept as it was, not redone
    # Only synthesis calls for the missing repeats (and pool samples for problems whose pool was unfinished).
    missing = repeats * problems - len(done_before)
    extra = samples_served(fast_server) - served_before
    assert missing <= extra <= missing + 4 * problems

    served_before = samples_served(fast_server)
    second_seed = pacore_in_process("run", *common, "--repeats", str(repeats), "--seed", "2")
    assert second_seed.returncode == 0, second_seed.stderr
    assert samples_served(fast_server) - served_before == repeats * problems  # one synthesis each, no new pool
    report = pacore_in_process("report", str(run_dir), "--json")
    assert report.returncode == 0, report.stderr
    (figures,) = json.loads(report.stdout)["methods"]
    assert (figures["problems"], figures["results"], figures["repeats"], figures["answered"]) == (
        problems, 2 * repeats * problems, 2 * repeats, 2 * repeats * problems,
    )  # fmt: skip
    assert figures["interval_method"] == "normal approximation over problems"
    assert figures["ci_low"] <= figures["accuracy"] <= figures["ci_high"]


def test_a_changed_method_or_data_set_is_refused_unless_forced(fast_server: str, data: Path, tmp_path: Path) -> None:
    # What the command says, not its process: in this process (the other tests here start real ones).
    run_dir = tmp_path / "run"
    backend = ["--backend", fast_server, "--model", "fast", "--max-tokens", "6", "--quiet"]
    first = pacore_in_process("run", str(data), "--out", str(run_dir), "--limit", "2", "--schedule", "1", *backend)
    assert first.returncode == 0, first.stderr

    method = pacore_in_process("run", str(data), "--out", str(run_dir), "--limit", "2", "--method", "single", *backend)
    assert_one_line_error(method, 2, "holds pacore-1, not single; add --add-arm")
    other_data = pacore_in_process("run", str(data), "--out", str(run_dir), "--limit", "3", "--schedule", "1", *backend)
    assert_one_line_error(other_data, 2, "holds a run of another data set (2 problems")
    other_settings = pacore_in_process("run", str(data), "--out", str(run_dir), "--limit", "2", "--schedule", "1",
                            *backend, "--temperature", "0.5")  # fmt: skip
    assert_one_line_error(other_settings, 2, "temperature 1.0 -> 0.5")

    added = pacore_in_process(
        "run", str(data), "--out", str(run_dir), "--limit", "2", "--method", "single", "--add-arm", *backend
    )
    assert added.returncode == 0, added.stderr
    forced = pacore_in_process(
        "run", str(data), "--out", str(run_dir), "--limit", "3", "--schedule", "1", "--force", *backend
    )
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.startswith("pacore-1: 3/3 answered")
    assert len(list(run_dir.glob("run.replaced-*.sqlite"))) == 1


def test_failed_problems_exit_1_and_are_retried(data: Path, tmp_path: Path) -> None:
    closed = closed_port_url()
    run_dir = tmp_path / "run"
    process = pacore("run", str(data), "--out", str(run_dir), "--limit", "2", "--schedule", "1",
                     "--backend", closed, "--retries", "0", "--model", "m")  # fmt: skip
    assert process.returncode == 1
    assert "[1/2] p0: failed: round 1: the call failed:" in process.stderr  # one line per problem in a pipe
    assert process.stdout.startswith("pacore-1: 0/2 answered, 2 failed, accuracy n/a")
    assert process.stderr.splitlines()[-1].startswith("pacore: error: 2 of 2 problems failed")
    again = pacore("run", str(data), "--out", str(run_dir), "--limit", "2", "--schedule", "1",
                   "--backend", closed, "--retries", "0", "--model", "m")  # fmt: skip
    assert "2 failed (retrying them; --no-retry-failed skips them)" in again.stderr


def test_live_display_shows_problems_flight_tokens_accuracy_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    progress = BatchProgress(arm="pacore-4", total=10, done=3, failed=1, todo=8, finished_now=4, correct=2,
                             graded=3, in_flight=6, completion_tokens=12_345)  # fmt: skip
    # 4 problems in 10 s: 4 more take 10 s (the clock stands still, so a slow machine reads the same ETA).
    monkeypatch.setattr(runner.time, "perf_counter", lambda: progress.started + 10)
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(LiveBatchDisplay(console, progress).render())
    line = console.export_text()
    for part in ("pacore-4", "4/10 problems (1 failed)", "6 in flight", "12,345 tokens", "accuracy 66.7%", "ETA 10.0s"):
        assert part in line, line


@pytest.mark.model
@pytest.mark.skipif(not GSM8K.exists(), reason="needs ../shared/data/gsm8k_test_1000.jsonl")
def test_gsm8k_with_the_embedded_model_then_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "gsm8k"
    common = ["--out", str(run_dir), "--limit", "3", "--max-tokens", "24", "--seed", "1"]
    pacore_run = pacore("run", str(GSM8K), *common, "--method", "pacore", "--schedule", "2")
    assert pacore_run.returncode == 0, pacore_run.stderr
    assert "new run in" in pacore_run.stderr and "[3/3]" in pacore_run.stderr
    majority = pacore("run", str(GSM8K), *common, "--method", "majority", "--samples", "2", "--add-arm")
    assert majority.returncode == 0, majority.stderr

    report = pacore_in_process("report", str(run_dir), "--json")
    assert report.returncode == 0, report.stderr
    methods = {m["arm"]: m for m in json.loads(report.stdout)["methods"]}
    assert set(methods) == {"pacore-2", "majority-2"}
    for arm, calls in (("pacore-2", 3), ("majority-2", 2)):
        figures = methods[arm]
        assert (figures["problems"], figures["answered"], figures["failed"], figures["graded"]) == (3, 3, 0, 3)
        assert 0 < figures["mean_completion_tokens"] <= calls * 24
        assert 0 <= figures["accuracy"] <= 1
    assert methods["pacore-2"]["synthesis"]["synthesized"] == 3
    for name in ("report.md", "report.html", "accuracy_vs_ttc.png"):
        assert (run_dir / name).stat().st_size > 0
    with sqlite3.connect(run_dir / "run.sqlite") as db:
        truths = [row[0] for row in db.execute("SELECT ground_truth FROM problems ORDER BY position")]
        shapes = [
            [len(r["trajectories"]) for r in json.loads(trace)["rounds"]]
            for (trace,) in db.execute("SELECT trace_json FROM results WHERE arm = 'pacore-2'")
        ]
    assert truths[0] == "18"  # Janet's ducks
    assert shapes == [[2, 1]] * 3
