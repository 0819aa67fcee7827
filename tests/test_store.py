"""The run store: migrations, per-problem commits, the writer lock, --force."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pacore import database
from pacore import store as store_module
from pacore.errors import RunConflictError, StoreError
from pacore.store import ArmInfo, ProblemResult, RunInfo, RunStore, StoredProblem
from pacore.trace import Result, Round, Trajectory, Usage

PROBLEMS = [
    StoredProblem("p1", 0, [{"role": "user", "content": "1+1?"}], "2", "gsm8k"),
    StoredProblem("p2", 1, [{"role": "user", "content": "2+2?"}], None, "auto"),
]
INFO = RunInfo("data.jsonl", "abc123", 2, {"model": "m", "params": {"temperature": 1.0}}, pool_size=None)


def new_store(tmp_path: Path) -> RunStore:
    store = RunStore.open(tmp_path / "run", writer=True)
    store.init_run(INFO, PROBLEMS)
    store.add_arm(ArmInfo("pacore-4", "pacore", "4"), ["p1", "p2"])
    return store


def migration_rows(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path / "run.sqlite") as db:
        return db.execute("SELECT name, applied_at FROM schema_migrations ORDER BY name").fetchall()


def test_migrations_are_applied_once_and_recorded(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with RunStore.open(run_dir, writer=True) as store:
        assert store.applied_migrations() == {m.__name__ for m in store_module.MIGRATIONS}
    first = migration_rows(run_dir)
    with RunStore.open(run_dir, writer=True) as store:
        assert store.migrate() == []  # nothing left to apply
    assert migration_rows(run_dir) == first  # not re-applied, not re-recorded


def test_a_new_migration_runs_once_on_an_existing_database(tmp_path: Path, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    new_store(tmp_path).close()
    calls = []

    def m900_add_note_column(db: sqlite3.Connection) -> None:
        calls.append(1)
        db.execute("ALTER TABLE results ADD COLUMN note TEXT")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, m900_add_note_column])
    with RunStore.open(run_dir, writer=True) as store:
        assert "m900_add_note_column" in store.applied_migrations()
        # Data written before the migration is still there.
        assert store.statuses("pacore-4") == {("p1", 0, 0): "pending", ("p2", 0, 0): "pending"}
    with RunStore.open(run_dir) as store:
        pass
    assert calls == [1]
    assert [name for name, _ in migration_rows(run_dir)].count("m900_add_note_column") == 1


def test_a_failing_migration_leaves_no_trace(tmp_path: Path, monkeypatch) -> None:
    def m901_broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half_done (x INTEGER)")
        db.execute("THIS IS NOT SQL")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, m901_broken])
    with pytest.raises(StoreError, match="cannot use"):
        RunStore.open(tmp_path / "run", writer=True)
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:-1])
    with RunStore.open(tmp_path / "run", writer=True) as store:
        tables = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "half_done" not in tables  # rolled back with the migration
        assert "m901_broken" not in store.applied_migrations()


def test_store_uses_wal_and_round_trips_results_with_traces(tmp_path: Path) -> None:
    trace = Result(
        answer="2",
        schedule=[1],
        rounds=[Round(index=0, k=1, trajectories=[Trajectory(round=0, index=0, text="2", message="2")])],
        usage=Usage(prompt_tokens=5, completion_tokens=7, calls=1),
    )
    with new_store(tmp_path) as store:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        store.record(
            "pacore-4",
            ProblemResult("p1", "done", answer="2", extracted="2", correct=True, prompt_tokens=5,
                          completion_tokens=7, calls=1, wall_s=0.5, trace=trace),
        )  # fmt: skip
        store.record("pacore-4", ProblemResult("p2", "failed", error="round 1: all failed"))
    # A fresh reader sees exactly what was committed.
    with RunStore.open(tmp_path / "run") as reader:
        first, second = reader.results("pacore-4")
        assert (first.status, first.correct, first.completion_tokens, first.attempts) == ("done", True, 7, 1)
        assert first.trace == trace
        assert (second.status, second.error, second.correct, second.trace) == (
            "failed", "round 1: all failed", None, None,
        )  # fmt: skip
        assert [p.id for p in reader.problems()] == ["p1", "p2"]
        assert reader.problems()[1].ground_truth is None


def test_recording_an_unknown_problem_is_refused(tmp_path: Path) -> None:
    with new_store(tmp_path) as store, pytest.raises(StoreError, match="no problem"):
        store.record("pacore-4", ProblemResult("nope", "done"))


def test_pool_rows_are_unique_per_problem_and_index(tmp_path: Path) -> None:
    with new_store(tmp_path) as store:
        store.add_pool("p1", [Trajectory(round=0, index=i, text=f"t{i}") for i in range(3)])
        with pytest.raises(sqlite3.IntegrityError):
            store.add_pool("p1", [Trajectory(round=0, index=3, text="new"), Trajectory(round=0, index=1, text="dup")])
        # The failed insert was one transaction: index 3 did not sneak in.
        assert [t.text for t in store.pool("p1")] == ["t0", "t1", "t2"]
        assert store.pool_counts() == {"p1": 3}


def test_one_writer_per_run_directory(tmp_path: Path) -> None:
    with new_store(tmp_path):
        with pytest.raises(StoreError, match="in use by another pacore run"):
            RunStore.open(tmp_path / "run", writer=True)
        # Readers (reports) are welcome meanwhile.
        with RunStore.open(tmp_path / "run") as reader:
            assert reader.run_info() is not None
    RunStore.open(tmp_path / "run", writer=True).close()  # released on close


def test_reader_needs_an_existing_run(tmp_path: Path) -> None:
    with pytest.raises(RunConflictError, match="not a run directory"):
        RunStore.open(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunConflictError, match="not a directory"):
        RunStore.open(tmp_path / "file", writer=True)


def test_reset_sets_the_old_database_aside(tmp_path: Path) -> None:
    with new_store(tmp_path) as store:
        store.record("pacore-4", ProblemResult("p1", "done", answer="2"))
        moved = store.reset()
        assert store.run_info() is None and store.arms() == []
    assert moved is not None and moved.parent == tmp_path / "run"
    with sqlite3.connect(moved) as old:  # complete on its own, WAL folded in
        assert old.execute("SELECT answer FROM results WHERE problem_id = 'p1'").fetchone() == ("2",)


def test_m002_keys_old_results_as_repeat_0_of_the_run_seed(tmp_path: Path, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    # A database as pacore wrote it before repeats existed.
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    with RunStore.open(run_dir, writer=True) as old:
        old.init_run(RunInfo("d.jsonl", "f", 2, {"model": "m", "params": {"seed": 7}}), PROBLEMS)
        old.db.execute("INSERT INTO arms (name, method, schedule, created_at) VALUES ('pacore-4', 'pacore', '4', 'x')")
        old.db.execute(
            "INSERT INTO results (arm, problem_id, status, answer, correct, completion_tokens, attempts) "
            "VALUES ('pacore-4', 'p1', 'done', 'two', 1, 9, 1), ('pacore-4', 'p2', 'pending', NULL, NULL, 0, 0)"
        )
    monkeypatch.undo()
    with RunStore.open(run_dir, writer=True) as store:
        assert "m002_repeats" in store.applied_migrations()
        done, pending = store.results("pacore-4")
        assert (done.problem_id, done.seed, done.repeat, done.answer, done.correct, done.completion_tokens) == (
            "p1", 7, 0, "two", True, 9,
        )  # fmt: skip
        assert (pending.seed, pending.repeat, pending.status) == (7, 0, "pending")
        # New repeats join beside the old rows; existing ones are left as they are.
        assert store.add_repeats("pacore-4", ["p1", "p2"], seed=7, repeats=2) == 2
        assert store.add_repeats("pacore-4", ["p1", "p2"], seed=7, repeats=2) == 0
        store.record("pacore-4", ProblemResult("p1", "done", answer="2", seed=7, repeat=1))
        assert store.result("pacore-4", "p1").answer == "two"  # the first repeat
        with pytest.raises(StoreError, match="seed 8, repeat 0"):
            store.record("pacore-4", ProblemResult("p1", "done", seed=8))
        assert store.statuses("pacore-4") == {
            ("p1", 7, 0): "done", ("p1", 7, 1): "done", ("p2", 7, 0): "pending", ("p2", 7, 1): "pending",
        }  # fmt: skip
        indexes = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "results_by_status" in indexes


def test_add_arm_creates_every_repeat_of_its_seed(tmp_path: Path) -> None:
    with RunStore.open(tmp_path / "run", writer=True) as store:
        store.init_run(INFO, PROBLEMS)
        store.add_arm(ArmInfo("single", "single"), ["p1", "p2"], seed=3, repeats=2)
        assert sorted(store.statuses("single")) == [("p1", 3, 0), ("p1", 3, 1), ("p2", 3, 0), ("p2", 3, 1)]


def test_a_results_key_is_its_key_in_statuses(tmp_path: Path) -> None:
    with RunStore.open(tmp_path / "run", writer=True) as store:
        store.init_run(INFO, PROBLEMS)
        store.add_arm(ArmInfo("single", "single"), ["p1", "p2"], seed=3, repeats=2)
        store.record("single", ProblemResult("p2", "done", answer="4", seed=3, repeat=1))
        results = list(store.results("single", traces=False))
        assert [r.key for r in results] == [("p1", 3, 0), ("p1", 3, 1), ("p2", 3, 0), ("p2", 3, 1)]
        assert {r.key: r.status for r in results} == store.statuses("single")
        assert store.statuses("single")["p2", 3, 1] == "done"


def test_the_sqlite_helpers_stay_importable_from_the_store() -> None:
    # They moved to pacore.database; docs/structure.md promises their old import path.
    names = (
        "connect",
        "migrate",
        "transaction",
        "applied_migrations",
        "Migration",
        "CheckedConnection",
        "CheckedCursor",
    )
    for name in names:
        assert getattr(store_module, name) is getattr(database, name)


def test_m004_gives_old_results_no_grade_note_and_new_ones_keep_theirs(tmp_path: Path, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    # A database as pacore wrote it before grade notes existed, with a graded result.
    before = store_module.MIGRATIONS.index(store_module.m004_result_grade_note)
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:before])
    with new_store(tmp_path) as old:
        old.db.execute(
            "UPDATE results SET status = 'done', answer = 'three', correct = 0, attempts = 1 WHERE problem_id = 'p1'"
        )
        assert "grade_note" not in {row[1] for row in old.db.execute("PRAGMA table_info(results)")}
    monkeypatch.undo()
    with RunStore.open(run_dir) as reader:  # a reader (pacore report) migrates it too
        old_result = reader.result("pacore-4", "p1")
        assert old_result is not None
        assert (old_result.answer, old_result.correct, old_result.grade_note) == ("three", False, None)
    with RunStore.open(run_dir, writer=True) as store:
        assert "m004_result_grade_note" in store.applied_migrations()
        store.record(
            "pacore-4", ProblemResult("p2", "done", answer="4", correct=False, grade_note="comparison cut after 20 s")
        )
        store.record("pacore-4", ProblemResult("p1", "done", answer="2", correct=True))
    with RunStore.open(run_dir) as reader:
        first, second = reader.results("pacore-4")
        assert (first.answer, first.correct, first.grade_note, first.attempts) == ("2", True, None, 2)
        assert (second.correct, second.grade_note) == (False, "comparison cut after 20 s")


def test_a_rerun_result_replaces_its_grade_note(tmp_path: Path) -> None:
    with new_store(tmp_path) as store:
        store.record("pacore-4", ProblemResult("p1", "done", correct=False, grade_note="answer too heavy"))
        assert store.result("pacore-4", "p1").grade_note == "answer too heavy"
        store.record("pacore-4", ProblemResult("p1", "done", correct=True))
        assert store.result("pacore-4", "p1").grade_note is None
