"""``pacore regrade``: a run's stored answers graded again with the current grader, nothing generated."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_harness import assert_one_line_error, pacore, pacore_in_process
from fakes import ScriptedBackend
from pacore import database
from pacore.database import CheckedConnection
from pacore.errors import StoreError, StoreUnusableError
from pacore.eval.datasets import Problem
from pacore.eval.grading import extract_answer, grade_verdict
from pacore.eval.regrade import regrade_run
from pacore.eval.runner import Arm, BatchRun, run_dataset
from pacore.store import DB_NAME, RunStore

HALF = r"\frac{1}{2}"
HEAVY = "9^{9^{9}}"  # screened out of math-verify: graded incorrect without being judged
RESPONSES = {"Half?": rf"So the answer is \boxed{{{HALF}}}.", "Five?": rf"So \boxed{{{HEAVY}}}.", "Free?": "It is 7"}
PROBLEMS = [
    Problem(id="half", messages=[{"role": "user", "content": "Half?"}], answer=HALF, kind="math", line=1),
    Problem(id="heavy", messages=[{"role": "user", "content": "Five?"}], answer="5", kind="math", line=2),
    Problem(id="free", messages=[{"role": "user", "content": "Free?"}], answer=None, kind="auto", line=3),
]


def build_run(path: Path) -> None:
    """A single and a majority-3 arm over the three problems, all answered."""
    backend = ScriptedBackend(respond=lambda call, i: RESPONSES[call.last_user_text])
    for arm, add_arm in ((Arm.build("single"), False), (Arm.build("majority", samples=3), True)):
        asyncio.run(run_dataset(path, PROBLEMS, dataset_path="d.jsonl", arm=arm, backend=backend, add_arm=add_arm))


def grade_as_before(path: Path) -> None:
    """Store every grade as the grader before the fix did: the answer searched again for an answer
    (a vote's too: \\frac{1}{2} read as its last number, 2) and no grade note (the column came later)."""
    kinds = {p.id: (p.answer, p.kind) for p in PROBLEMS}
    with sqlite3.connect(path / DB_NAME) as db:
        rows = db.execute("SELECT arm, problem_id, answer FROM results").fetchall()
        for arm, problem_id, answer in rows:
            truth, kind = kinds[problem_id]
            correct = None if truth is None else int(grade_verdict(answer, truth, kind).correct)
            db.execute(
                "UPDATE results SET extracted = ?, correct = ?, grade_note = NULL WHERE arm = ? AND problem_id = ?",
                (extract_answer(answer, kind), correct, arm, problem_id),
            )


def stored(path: Path) -> dict[tuple[str, str], tuple]:
    """Every result's whole row, by (arm, problem)."""
    with sqlite3.connect(path / DB_NAME) as db:
        rows = db.execute("SELECT * FROM results").fetchall()
    return {(row[0], row[1]): row for row in rows}


def accuracy(path: Path, arm: str) -> float:
    process = pacore_in_process("report", str(path), "--json")
    assert process.returncode == 0, process.stderr
    return next(m["accuracy"] for m in json.loads(process.stdout)["methods"] if m["arm"] == arm)


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    build_run(path)
    grade_as_before(path)
    return path


def test_regrade_fixes_the_grades_the_old_grader_stored_and_a_second_changes_nothing(old_run: Path) -> None:
    with RunStore.open(old_run) as store:
        vote = store.result("majority-3", "half")
    assert vote is not None and (vote.answer, vote.extracted, vote.correct) == (HALF, "2", False)  # the old grade
    assert accuracy(old_run, "majority-3") == 0.0
    before = stored(old_run)

    process = pacore_in_process("regrade", str(old_run))

    assert process.returncode == 0, process.stderr
    assert process.stdout.splitlines() == [
        # The heavy answer was not judged: the note the old run could not store is added.
        "single: 2 results checked, 1 updated (0 wrong->right, 0 right->wrong; grade notes: 1 added, 0 cleared)",
        "majority-3: 2 results checked, 2 updated (1 wrong->right, 0 right->wrong; grade notes: 1 added, 0 cleared)",
    ]
    with RunStore.open(old_run) as store:
        graded = {(arm, r.problem_id): r for arm in ("single", "majority-3") for r in store.results(arm, traces=False)}
    half = graded["majority-3", "half"]
    assert (half.extracted, half.correct, half.grade_note) == (HALF, True, None)
    heavy = graded["majority-3", "heavy"]
    assert (heavy.extracted, heavy.correct, heavy.grade_note) == (
        HEAVY,
        False,
        "answer too heavy to compare symbolically",
    )
    assert graded["single", "heavy"].grade_note == "answer too heavy to compare symbolically"
    assert graded["single", "free"].correct is None and graded["majority-3", "free"].correct is None
    # Only the grade columns changed: answers, traces, attempts and dates are as the run left them.
    after = stored(old_run)
    grade_columns = {"extracted", "correct", "grade_note"}
    with sqlite3.connect(old_run / DB_NAME) as db:
        names = [c[1] for c in db.execute("PRAGMA table_info(results)")]
    kept = [i for i, name in enumerate(names) if name not in grade_columns]
    assert all([after[key][i] for i in kept] == [before[key][i] for i in kept] for key in before)
    assert sum(after[key] != before[key] for key in before) == 3
    # The report follows: 1 of the 2 graded majority results is right now.
    assert accuracy(old_run, "majority-3") == 0.5

    again = pacore_in_process("regrade", str(old_run))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        "single: 2 results checked, 0 updated (0 wrong->right, 0 right->wrong; grade notes: 0 added, 0 cleared)",
        "majority-3: 2 results checked, 0 updated (0 wrong->right, 0 right->wrong; grade notes: 0 added, 0 cleared)",
    ]
    assert stored(old_run) == after


def test_regrade_counts_grades_turned_wrong_and_notes_cleared(tmp_path: Path) -> None:
    path = tmp_path / "run"
    build_run(path)
    with sqlite3.connect(path / DB_NAME) as db:  # a right grade for the heavy answer, a note on the right one
        db.execute("UPDATE results SET correct = 1, grade_note = NULL WHERE problem_id = 'heavy'")
        db.execute("UPDATE results SET correct = 0, grade_note = 'comparison cut after 20 s' WHERE problem_id = 'half'")
    counts = regrade_run(path, ["majority-3"])
    assert [c.line() for c in counts] == [
        "majority-3: 2 results checked, 2 updated (1 wrong->right, 1 right->wrong; grade notes: 1 added, 1 cleared)"
    ]


def test_arm_limits_the_regrade_to_the_arms_named(old_run: Path) -> None:
    process = pacore_in_process("regrade", str(old_run), "--arm", "majority-3", "--arm", "majority-3")
    assert process.returncode == 0, process.stderr
    assert process.stdout.splitlines() == [
        "majority-3: 2 results checked, 2 updated (1 wrong->right, 0 right->wrong; grade notes: 1 added, 0 cleared)"
    ]
    with RunStore.open(old_run) as store:
        untouched = store.result("single", "heavy")
    assert untouched is not None and untouched.grade_note is None  # single was not re-graded


def test_regrade_skips_unfinished_results_and_a_result_redone_meanwhile(old_run: Path) -> None:
    with sqlite3.connect(old_run / DB_NAME) as db:
        db.execute("UPDATE results SET status = 'failed' WHERE arm = 'majority-3' AND problem_id = 'heavy'")
    assert regrade_run(old_run, ["majority-3"])[0].checked == 1
    # A result rewritten between its grading and the write keeps what the run wrote.
    with RunStore.open(old_run) as store:
        graded = store.result("single", "half")
        assert graded is not None
        graded.answer, graded.correct = "an answer the run no longer holds", False
        assert store.update_grades("single", [graded]) == []
        kept = store.result("single", "half")
    assert kept is not None and kept.correct is True


async def test_regrade_works_while_a_run_writes_the_directory(old_run: Path) -> None:
    """pacore run keeps the run lock and its connection for its whole run; regrade needs no lock,
    only short write transactions, and both commit to the same database meanwhile."""
    backend = ScriptedBackend(
        respond=lambda call, i: RESPONSES[call.last_user_text],
        gate=threading.Event(),
        held=lambda call: call.last_user_text == "Free?",
    )
    arm = Arm.build("majority", samples=5)
    with BatchRun.open(
        old_run, PROBLEMS, dataset_path="d.jsonl", arm=arm, backend=backend, add_arm=True, concurrency=3
    ) as batch:
        running = asyncio.create_task(batch.execute())
        async with asyncio.timeout(60):
            while batch.progress.done < 2:  # half and heavy committed, free held at the gate
                await asyncio.sleep(0.01)
        counts = regrade_run(old_run)
        backend.gate.set()
        summary = await running
    assert [(c.arm, c.checked, c.updated) for c in counts] == [
        ("single", 2, 1),
        ("majority-3", 2, 2),
        ("majority-5", 2, 0),
    ]
    assert (summary.answered, summary.graded, summary.correct) == (3, 2, 1)
    again = regrade_run(old_run)
    assert [(c.checked, c.updated) for c in again] == [(2, 0), (2, 0), (2, 0)]


def test_regrade_in_a_subprocess(old_run: Path) -> None:
    process = pacore("regrade", str(old_run), "--arm", "majority-3")
    assert process.returncode == 0, process.stderr
    assert process.stdout == (
        "majority-3: 2 results checked, 2 updated (1 wrong->right, 0 right->wrong; grade notes: 1 added, 0 cleared)\n"
    )
    assert process.stderr == ""


def test_bad_input_is_a_one_line_usage_error(old_run: Path, tmp_path: Path) -> None:
    before = stored(old_run)
    assert_one_line_error(pacore_in_process("regrade", str(old_run), "--arm", "nope"), 2, "has no arm 'nope'")
    assert stored(old_run) == before  # refused before anything was graded
    assert_one_line_error(pacore_in_process("regrade", str(tmp_path / "none")), 2, "is not a run directory")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(pacore_in_process("regrade", str(tmp_path / "file")), 2, "is not a directory")
    assert_one_line_error(pacore_in_process("regrade"), 2, "Missing argument 'RUN_DIR'")


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Another program's write transaction on ``path``'s database, held until the block ends."""
    holder = sqlite3.connect(path / DB_NAME, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@contextlib.contextmanager
def unwritable_store(path: Path, why: str) -> Iterator[RunStore]:
    """``path``'s store, opened so that writing it fails: ``why`` is "read-only", "locked" or "full"."""
    if why == "read-only":  # root ignores file modes: the database is opened read-only through SQLite itself
        db = sqlite3.connect(
            f"file:{path / DB_NAME}?mode=ro", uri=True, isolation_level=None, factory=CheckedConnection
        )
        db.row_factory = sqlite3.Row
        with RunStore(path, db, None) as store:
            yield store
    elif why == "locked":
        with write_lock_held(path), RunStore.open(path) as store:
            store.db.execute("PRAGMA busy_timeout = 100")  # not the 30 s a regrade waits
            yield store
    else:  # the disk full at the database's present size
        with RunStore.open(path) as store:
            pages = store.db.execute("PRAGMA page_count").fetchone()[0]
            store.db.execute(f"PRAGMA max_page_count = {pages}")
            yield store


@pytest.mark.parametrize(
    ("why", "error", "fragment"),
    [("read-only", StoreUnusableError, "is read-only"), ("locked", StoreError, "is locked by another process"),
     ("full", StoreError, "the disk or database is full")],
    ids=["read-only", "locked", "full"],
)  # fmt: skip
def test_a_store_that_cannot_be_written_is_a_one_line_store_error(
    old_run: Path, why: str, error: type[StoreError], fragment: str
) -> None:
    before = stored(old_run)
    with unwritable_store(old_run, why) as store:
        # Answers long enough to need new pages: a full database cannot take them.
        graded = [dataclasses.replace(r, extracted="7" * 100_000) for r in store.results("single", traces=False)]
        with pytest.raises(StoreError) as caught:
            store.update_grades("single", graded)
        assert type(caught.value) is error and fragment in str(caught.value) and "\n" not in str(caught.value)
        assert not store.db.in_transaction  # rolled back, by SQLite itself when the disk was full
    assert stored(old_run) == before


def test_regrade_of_a_locked_run_is_a_one_line_error_and_writes_nothing(old_run: Path, monkeypatch) -> None:
    monkeypatch.setattr(database, "BUSY_TIMEOUT_S", 0.1)
    before = stored(old_run)
    with write_lock_held(old_run):
        assert_one_line_error(pacore_in_process("regrade", str(old_run)), 1, "is locked by another process")
    assert stored(old_run) == before
    assert [c.updated for c in regrade_run(old_run)] == [1, 2]  # once the lock is released
