"""``pacore run`` under injected faults and SIGKILLs: every problem answered exactly once, none lost.

The reduced form of ``bench/reliability.py`` (60 problems, 3 kills; the bench
runs 200 and every fault kind alone): the real CLI in its own process against
``bench/fastbackend.py --faults all:0.2``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pacore.store import ArmInfo, ProblemResult, RunInfo, RunStore, StoredProblem
from pacore.trace import Result
from reliability import ARM, Checker, Figures, Scenario, run_scenario

PROBLEMS = 60


@pytest.mark.slow
@pytest.mark.http
def test_faults_and_sigkills_leave_every_problem_answered_exactly_once(tmp_path: Path) -> None:
    # --retries 0: a fifth of the calls fail outright, so problems fail and reruns must retry them.
    scenario = Scenario("all kinds + SIGKILL", "all:0.2", PROBLEMS, kills=3, retries=0)
    figures = run_scenario(scenario, tmp_path, seed=3)

    # Most fault kinds were injected, and problems failed, each recorded with its reason.
    assert len(figures.injected) >= 8 and sum(figures.injected.values()) >= 20
    assert sum(figures.failures.values()) >= 5 and all(reason.strip() for reason in figures.failures)
    # Every failure was retried by a later resume or rerun (all ended done) while no done
    # problem was touched again (duplicated == 0); a rerun retried exactly what had failed.
    assert figures.reruns >= 1 and figures.retried >= figures.run_failed and figures.not_retried == 0
    assert (figures.answered, figures.failed, figures.lost, figures.duplicated) == (PROBLEMS, 0, 0, 0)
    assert figures.tracebacks == 0

    # The store itself: one row per problem, all done, nothing else.
    with sqlite3.connect(tmp_path / "run" / "run.sqlite") as db:
        rows = db.execute("SELECT problem_id, status, COUNT(*) FROM results WHERE arm = ? GROUP BY problem_id", (ARM,))
        found = {problem: (status, count) for problem, status, count in rows}
    assert found == {f"p{i}": ("done", 1) for i in range(PROBLEMS)}


def test_the_checker_counts_what_is_lost_or_answered_twice(tmp_path: Path) -> None:
    """The bench's own bookkeeping can fail: a re-answered or unresolved problem is counted."""
    problems = [StoredProblem(f"p{i}", i, [{"role": "user", "content": "q"}], "1", "math") for i in range(3)]
    info = RunInfo(dataset_path="d", dataset_fingerprint="f", problem_count=3, config={})
    trace = Result(answer="1", schedule=[], rounds=[], usage={})
    with RunStore.open(tmp_path, writer=True) as store:
        store.init_run(info, problems)
        store.add_arm(ArmInfo(ARM, "pacore", "2"), ["p0", "p1", "p2"])
        figures = Figures("t", "-", 3)
        checker = Checker(tmp_path, 3, figures)
        store.record(ARM, ProblemResult("p0", "done", answer="1", trace=trace))
        store.record(ARM, ProblemResult("p1", "failed", error="backend down"))
        checker.after(completed=False)
        assert (figures.lost, figures.duplicated) == (0, 0)
        checker.after(completed=True)
        assert (figures.lost, figures.duplicated) == (1, 0)  # p2 still pending after a normal end

        store.record(ARM, ProblemResult("p1", "done", answer="1", trace=trace))  # a retry: fine
        store.record(ARM, ProblemResult("p2", "failed", error=""))  # failed without a reason: lost
        checker.after(completed=True)
        assert (figures.lost, figures.duplicated) == (1, 0)
        store.record(ARM, ProblemResult("p0", "done", answer="1", trace=trace))  # answered again
        checker.after(completed=True)
        assert figures.duplicated == 1
