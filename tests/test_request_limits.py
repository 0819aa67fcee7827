"""``--deadline`` and ``--min-success`` of ``pacore ask`` and ``pacore run``, end to end."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cli_harness import error_line, pacore, pacore_in_process
from fakes import Call, ScriptedBackend, fail
from faults import FaultPlan
from harness import fast_backend
from pacore.eval.datasets import Problem
from pacore.eval.runner import Arm, run_dataset
from pacore.store import RunStore
from reliability import write_data


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--deadline", "0"], "--deadline must be a positive number of seconds, got 0"),
        (["--deadline", "-2"], "--deadline must be a positive number of seconds"),
        (["--min-success", "0"], "--min-success must be a fraction greater than 0 and at most 1, got 0"),
        (["--min-success", "1.5"], "--min-success must be a fraction"),
    ],
)
@pytest.mark.parametrize("command", ["ask", "run"])
def test_bad_limits_are_usage_errors_before_any_work(
    command: str, flags: list[str], message: str, tmp_path: Path
) -> None:
    target = ["q"] if command == "ask" else [str(write_data(tmp_path / "d.jsonl", 2)), "--out", str(tmp_path / "r")]
    # An unreachable backend: the flags must be refused before it is ever tried.
    process = pacore_in_process(command, *target, *flags, "--backend", "http://127.0.0.1:9/v1", "--model", "m")
    assert process.returncode == 2 and message in error_line(process.stderr)
    assert not (tmp_path / "r").exists()


@pytest.mark.http
def test_ask_gives_up_at_its_deadline_and_keeps_the_partial_trace() -> None:
    # The first token would come after 10 minutes: only the deadline can end the command sooner.
    with fast_backend("--ttft-ms", 600_000) as server:
        process = pacore("ask", "q", "-b", server.url, "--model", "fast", "-s", "2", "--deadline", "0.5", "--json")
    assert process.returncode == 1
    assert "deadline of 0.5s exceeded in round 1 of 2" in error_line(process.stderr)


def seed_failing_some_of_round_one(k: int) -> int:
    """A fault seed under which, of the ``k + 1`` calls of schedule ``[k]`` made one by one
    at first, the first and the last (the synthesis) succeed and at most half of the rest fail."""
    for seed in range(1000):
        plan = FaultPlan({"503": 0.3}, seed)
        draws = [plan.draw() for _ in range(k + 1)]
        if draws[0] is None and draws[-1] is None and 1 <= draws.count("503") <= k // 2:
            return seed
    raise AssertionError("no such seed")


@pytest.mark.http
def test_ask_min_success_stops_a_round_with_too_few_trajectories() -> None:
    # The server refuses n > 1 (not a fault), so the round of 6 becomes 6 single calls after the first.
    seed = seed_failing_some_of_round_one(6)
    server_args = ("--n-support", "reject", "--faults", "503:0.3", "--fault-seed", seed)
    common = ["ask", "q", "--model", "fast", "--schedule", "6", "--retries", "0", "--quiet"]
    with fast_backend(*server_args) as server:
        strict = pacore(*common, "-b", server.url, "--min-success", "1")
    with fast_backend(*server_args) as server:  # the same faults again
        lenient = pacore(*common, "-b", server.url, "--min-success", "0.3")
    assert strict.returncode == 1
    assert "round 1: only " in error_line(strict.stderr) and "6 required (min_success=1)" in strict.stderr
    assert lenient.returncode == 0, lenient.stderr


@pytest.mark.http
@pytest.mark.parametrize(
    ("method", "where"),
    [(["--schedule", "2"], "in round 1 of 2"), (["--method", "majority", "--samples", "3"], "while sampling")],
)
def test_run_deadline_fails_each_problem_with_its_reason(method: list[str], where: str, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data.jsonl", 3)
    with fast_backend("--ttft-ms", 60_000) as server:  # only the deadline can end a problem, however slow the machine
        process = pacore("run", str(data), "--out", str(tmp_path / "run"), "-b", server.url, "--model", "fast",
                         *method, "--deadline", "0.3", "--quiet")  # fmt: skip
    assert process.returncode == 1 and "3 of 3 problems failed" in error_line(process.stderr)
    with sqlite3.connect(tmp_path / "run" / "run.sqlite") as db:
        errors = [e for (e,) in db.execute("SELECT error FROM results WHERE status = 'failed'")]
    assert errors == [f"deadline of 0.3s exceeded {where}"] * 3


# --- in the batch runner, on a scripted backend ---------------------------------------


def scripted_problems(count: int) -> list[Problem]:
    return [Problem(id=f"q{i}", messages=[{"role": "user", "content": f"q{i}"}], answer="1", kind="math", line=i + 1)
            for i in range(count)]  # fmt: skip


async def test_min_success_applies_to_majority_samples(tmp_path: Path) -> None:
    # Of each problem's 4 samples, the first fails.
    backend = ScriptedBackend(respond=lambda call, i: fail("status") if call.number % 4 == 0 else "The answer is 1")
    arm = Arm.build("majority", samples=4)
    for min_success, expected in ((0.75, "done"), (1.0, "failed")):
        summary = await run_dataset(
            tmp_path / str(min_success), scripted_problems(2), dataset_path="d", arm=arm, backend=backend,
            concurrency=1, min_success=min_success,
        )  # fmt: skip
        with RunStore.open(tmp_path / str(min_success)) as store:
            outcomes = [(r.status, r.error) for r in store.results(arm.name)]
        assert [status for status, _ in outcomes] == [expected] * 2, outcomes
        if expected == "failed":
            assert outcomes[0][1].startswith("only 3 of 4 samples succeeded, 4 required (min_success=1)")
            assert summary.failed == 2


async def test_an_unforeseen_error_fails_its_problem_and_the_run_goes_on(tmp_path: Path) -> None:
    def respond(call: Call, i: int) -> str | BaseException:
        return RuntimeError("a bug in a backend") if "q1" in call.last_user_text else "The answer is 1"

    arm = Arm.build("pacore", schedule="2")
    summary = await run_dataset(
        tmp_path / "run", scripted_problems(3), dataset_path="d", arm=arm, backend=ScriptedBackend(respond=respond)
    )
    with RunStore.open(tmp_path / "run") as store:
        outcomes = {r.problem_id: (r.status, r.error) for r in store.results(arm.name)}
    assert outcomes == {
        "q0": ("done", None),
        "q1": ("failed", "unexpected RuntimeError: a bug in a backend"),
        "q2": ("done", None),
    }
    assert (summary.answered, summary.failed) == (2, 1)
