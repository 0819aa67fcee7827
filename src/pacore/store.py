"""The run store: one SQLite database per run directory (``RUN_DIR/run.sqlite``), its schema and queries.

The generic SQLite helpers (connection settings, migrations runner, checked
connection) are in :mod:`pacore.database`.

A run is one data set evaluated under one or more *arms* (a method with its
schedule or sample count). The database holds:

- ``run``: the data set (path and fingerprint), the generation settings every
  arm shares (sampling parameters, model, template; never API keys) and the
  trajectory pool size, if any;
- ``problems``: the data set's problems, so reports and exports need no data file;
- ``arms``: one row per method/schedule/samples evaluated in this run;
- ``results``: one row per (arm, problem, seed, repeat): pending, done or
  failed, with the answer, grade (and why it was not really judged, when it
  was not), tokens, wall time, failure reason and the whole trace. A problem
  is run ``repeats`` times per seed (independent pool draws or fresh
  samples); reports average over them;
- ``pool``: cached first-round trajectories, ``(problem, index)``.

The schema evolves through :data:`MIGRATIONS`, an ordered list of small
functions, each applied once and recorded in ``schema_migrations`` (by
:func:`pacore.database.migrate`). Never edit a released migration; append a new one.

Durability: WAL journal with ``synchronous=FULL`` and one transaction per
finished problem, so a run killed at any instant (even SIGKILL) keeps every
problem it had reported done. One writer per run directory at a time,
enforced by an ``flock`` on ``RUN_DIR/run.lock`` that dies with its process.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The SQLite helpers lived here first: they stay importable from this module (tests/test_store.py);
# ``as`` re-exports the one this module does not use.
from pacore.database import (
    CheckedConnection,
    Migration,
    applied_migrations,
    connect,
    migrate,
    now_iso,
    transaction,
)
from pacore.database import CheckedCursor as CheckedCursor
from pacore.errors import RunConflictError, StoreError
from pacore.trace import Result, Trajectory

DB_NAME = "run.sqlite"
LOCK_NAME = "run.lock"

MIGRATIONS: list[Migration] = []


def migration(function: Migration) -> Migration:
    MIGRATIONS.append(function)
    return function


#: A result's outcome columns, the same in the ``results`` table m001 creates and in the one m002
#: rebuilds it as. Applied migrations never change: a new column is a new migration.
_OUTCOME_COLUMNS = """status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
            answer TEXT,
            extracted TEXT,
            correct INTEGER,  -- NULL when the problem has no ground truth
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            calls INTEGER NOT NULL DEFAULT 0,
            wall_s REAL,
            error TEXT,
            trace_json TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            updated_at TEXT,"""


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    # One statement per execute: ``executescript`` would commit the migration's transaction.
    for statement in (
        """CREATE TABLE run (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            created_at TEXT NOT NULL,
            pacore_version TEXT NOT NULL,
            dataset_path TEXT NOT NULL,
            dataset_fingerprint TEXT NOT NULL,
            problem_count INTEGER NOT NULL,
            config_json TEXT NOT NULL,  -- settings shared by every arm, never credentials
            pool_size INTEGER  -- first-round trajectories pooled per problem, NULL for none
        )""",
        """CREATE TABLE problems (
            problem_id TEXT PRIMARY KEY,
            position INTEGER NOT NULL,
            messages_json TEXT NOT NULL,
            ground_truth TEXT,
            kind TEXT NOT NULL
        )""",
        """CREATE TABLE arms (
            name TEXT PRIMARY KEY,
            method TEXT NOT NULL CHECK (method IN ('pacore', 'single', 'majority')),
            schedule TEXT,
            samples INTEGER,
            created_at TEXT NOT NULL
        )""",
        f"""CREATE TABLE results (
            arm TEXT NOT NULL REFERENCES arms(name),
            problem_id TEXT NOT NULL REFERENCES problems(problem_id),
            {_OUTCOME_COLUMNS}
            PRIMARY KEY (arm, problem_id)
        )""",
        "CREATE INDEX results_by_status ON results (arm, status)",
        """CREATE TABLE pool (
            problem_id TEXT NOT NULL REFERENCES problems(problem_id),
            idx INTEGER NOT NULL,
            trajectory_json TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (problem_id, idx)
        )""",
    ):
        db.execute(statement)


@migration
def m002_repeats(db: sqlite3.Connection) -> None:
    # Results gain (seed, repeat) in their key: SQLite cannot alter a primary key,
    # so the table is rebuilt. Existing rows become repeat 0 of the run's seed.
    statements = (
        f"""CREATE TABLE results_repeats (
            arm TEXT NOT NULL REFERENCES arms(name),
            problem_id TEXT NOT NULL REFERENCES problems(problem_id),
            seed INTEGER NOT NULL DEFAULT 0,  -- the --seed that asked for it (0 when none)
            repeat INTEGER NOT NULL DEFAULT 0,  -- 0..R-1 for --repeats R
            {_OUTCOME_COLUMNS}
            PRIMARY KEY (arm, problem_id, seed, repeat)
        )""",
        """INSERT INTO results_repeats (arm, problem_id, seed, repeat, status, answer, extracted, correct,
            prompt_tokens, completion_tokens, calls, wall_s, error, trace_json, attempts, updated_at)
        SELECT arm, problem_id,
            COALESCE((SELECT json_extract(config_json, '$.params.seed') FROM run WHERE id = 1), 0), 0,
            status, answer, extracted, correct, prompt_tokens, completion_tokens, calls, wall_s, error,
            trace_json, attempts, updated_at
        FROM results ORDER BY rowid""",
        "DROP TABLE results",
        "ALTER TABLE results_repeats RENAME TO results",
        "CREATE INDEX results_by_status ON results (arm, status)",
    )
    for statement in statements:
        db.execute(statement)


@migration
def m003_arm_compute(db: sqlite3.Connection) -> None:
    # An arm may run an adaptive-compute policy: its non-default fields as JSON (NULL: none).
    db.execute("ALTER TABLE arms ADD COLUMN compute_json TEXT")


@migration
def m004_result_grade_note(db: sqlite3.Connection) -> None:
    # Why an answer graded incorrect was not really judged (comparison cut...); NULL: it was, or older.
    db.execute("ALTER TABLE results ADD COLUMN grade_note TEXT")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What a run directory is bound to."""

    dataset_path: str
    dataset_fingerprint: str
    problem_count: int
    #: Generation settings shared by every arm (params, model, template...).
    config: dict[str, Any]
    pool_size: int | None = None
    created_at: str = ""
    pacore_version: str = ""


@dataclass(frozen=True, slots=True)
class ArmInfo:
    """One method evaluated in a run: ``pacore`` with a schedule, ``majority`` with k samples..."""

    name: str
    method: str
    schedule: str | None = None  # a pacore arm's K-vector ("8,4")
    samples: int | None = None  # a majority arm's k
    created_at: str = ""
    #: The arm's adaptive-compute policy, its non-default ``ComputePolicy`` fields (``None``: none).
    compute: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class StoredProblem:
    id: str
    position: int
    messages: list[dict[str, Any]]
    ground_truth: str | None
    kind: str


@dataclass(slots=True)
class ProblemResult:
    """The outcome of one problem (one of its repeats) under one arm."""

    problem_id: str
    status: str  # "pending", "done" or "failed"
    #: Which draw of the problem this is: the command's seed and the repeat (0..R-1).
    seed: int = 0
    repeat: int = 0
    answer: str | None = None
    extracted: str | None = None
    #: ``None`` when the problem has no ground truth to grade against.
    correct: bool | None = None
    #: Why ``correct`` is ``False`` without the answers being compared (``"comparison cut after 20 s"``...,
    #: see :class:`pacore.eval.grading.GradeVerdict`); ``None`` when they were, or in runs stored before.
    grade_note: str | None = None
    error: str | None = None
    trace: Result | None = None
    #: When the result was last recorded (ISO 8601, UTC); ``None`` while it was never run.
    updated_at: str | None = None
    #: What it cost: the trace's token and call totals, the attempts made, the seconds taken.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    attempts: int = 0
    wall_s: float | None = None

    @property
    def key(self) -> RepeatKey:
        """This result's key within its arm: problem, seed, repeat."""
        return self.problem_id, self.seed, self.repeat


#: A result's key within an arm: problem, seed, repeat.
RepeatKey = tuple[str, int, int]


class RunStore:
    """The database of one run directory. Open it with :meth:`open`."""

    def __init__(self, run_dir: Path, db: sqlite3.Connection, lock_fd: int | None) -> None:
        self.run_dir = run_dir
        self.db = db
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, run_dir: str | Path, *, writer: bool = False) -> RunStore:
        """Open ``run_dir``'s store.

        A writer creates the directory and database if needed and holds the
        directory's lock until :meth:`close`; a reader (reports, exports)
        needs an existing run and may read while a writer works.
        """
        run_dir = Path(run_dir)
        path = run_dir / DB_NAME
        lock_fd = None
        if run_dir.exists() and not run_dir.is_dir():
            raise RunConflictError(f"{run_dir} is not a directory")
        if writer:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create run directory {run_dir}: {exc.strerror or exc}") from None
            lock_fd = _lock(run_dir)
        elif not path.is_file():
            raise RunConflictError(f"{run_dir} is not a run directory (no {DB_NAME}); create one with 'pacore run'")
        try:
            store = cls(run_dir, connect(path, factory=CheckedConnection), lock_fd)
            store.migrate()
        except BaseException as exc:
            if lock_fd is not None:
                os.close(lock_fd)
            if isinstance(exc, sqlite3.DatabaseError):
                raise StoreError(f"cannot use {path}: {exc}") from None
            raise
        return store

    def reset(self) -> Path | None:
        """Start this directory afresh (``--force``): the old database is kept aside.

        Returns where the old database went (``None`` if there was none).
        """
        self.db.close()
        moved = _set_aside(self.run_dir / DB_NAME)
        self.db = connect(self.run_dir / DB_NAME, factory=CheckedConnection)
        self.migrate()
        return moved

    def close(self) -> None:
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.db)

    # --- schema ---------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply pending migrations, each in its own transaction; returns their names."""
        return migrate(self.db, MIGRATIONS)

    def applied_migrations(self) -> set[str]:
        return applied_migrations(self.db)

    # --- run and problems ----------------------------------------------

    def run_info(self) -> RunInfo | None:
        row = self.db.execute("SELECT * FROM run WHERE id = 1").fetchone()
        if row is None:
            return None
        return RunInfo(
            dataset_path=row["dataset_path"],
            dataset_fingerprint=row["dataset_fingerprint"],
            problem_count=row["problem_count"],
            config=json.loads(row["config_json"]),
            pool_size=row["pool_size"],
            created_at=row["created_at"],
            pacore_version=row["pacore_version"],
        )

    def init_run(self, info: RunInfo, problems: Iterable[StoredProblem]) -> None:
        """Bind an empty store to its data set and settings (one transaction)."""
        from pacore import __version__

        with self.transaction() as db:
            db.execute(
                "INSERT INTO run (id, created_at, pacore_version, dataset_path, dataset_fingerprint, "
                "problem_count, config_json, pool_size) VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                (
                    now_iso(), __version__, info.dataset_path, info.dataset_fingerprint,
                    info.problem_count, _dumps(info.config), info.pool_size,
                ),
            )  # fmt: skip
            db.executemany(
                "INSERT INTO problems (problem_id, position, messages_json, ground_truth, kind) VALUES (?, ?, ?, ?, ?)",
                [(p.id, p.position, _dumps(p.messages), p.ground_truth, p.kind) for p in problems],
            )

    def problems(self) -> list[StoredProblem]:
        rows = self.db.execute("SELECT * FROM problems ORDER BY position")
        return [
            StoredProblem(
                id=row["problem_id"],
                position=row["position"],
                messages=json.loads(row["messages_json"]),
                ground_truth=row["ground_truth"],
                kind=row["kind"],
            )
            for row in rows
        ]

    # --- arms and results ----------------------------------------------

    def arms(self) -> list[ArmInfo]:
        rows = self.db.execute("SELECT * FROM arms ORDER BY created_at, rowid")
        return [
            ArmInfo(
                row["name"],
                row["method"],
                row["schedule"],
                row["samples"],
                row["created_at"],
                json.loads(row["compute_json"]) if row["compute_json"] else None,
            )  # fmt: skip
            for row in rows
        ]

    def add_arm(self, arm: ArmInfo, problem_ids: Iterable[str], *, seed: int = 0, repeats: int = 1) -> None:
        """Create an arm with repeats ``0..repeats-1`` of ``seed`` pending for every problem (one transaction)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO arms (name, method, schedule, samples, created_at, compute_json) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    arm.name,
                    arm.method,
                    arm.schedule,
                    arm.samples,
                    now_iso(),
                    _dumps(arm.compute) if arm.compute else None,
                ),  # fmt: skip
            )
            _add_repeats(db, arm.name, problem_ids, seed, repeats)

    def add_repeats(self, arm: str, problem_ids: Iterable[str], *, seed: int, repeats: int) -> int:
        """Make repeats ``0..repeats-1`` of ``seed`` exist for every problem; returns how many were new."""
        with self.transaction() as db:
            return _add_repeats(db, arm, problem_ids, seed, repeats)

    def statuses(self, arm: str) -> dict[RepeatKey, str]:
        """``(problem_id, seed, repeat) -> status`` of every result of ``arm``."""
        rows = self.db.execute("SELECT problem_id, seed, repeat, status FROM results WHERE arm = ?", (arm,))
        return {(row["problem_id"], row["seed"], row["repeat"]): row["status"] for row in rows}

    def record(self, arm: str, result: ProblemResult) -> None:
        """Commit one problem's outcome with its trace, in its own transaction."""
        correct = None if result.correct is None else int(result.correct)
        trace = result.trace.model_dump_json() if result.trace is not None else None
        with self.transaction() as db:
            updated = db.execute(
                "UPDATE results SET status = ?, answer = ?, extracted = ?, correct = ?, "
                "prompt_tokens = ?, completion_tokens = ?, calls = ?, wall_s = ?, error = ?, "
                "trace_json = ?, attempts = attempts + 1, updated_at = ?, grade_note = ? "
                "WHERE arm = ? AND problem_id = ? AND seed = ? AND repeat = ?",
                (
                    result.status, result.answer, result.extracted, correct, result.prompt_tokens,
                    result.completion_tokens, result.calls, result.wall_s, result.error, trace,
                    now_iso(), result.grade_note, arm, *result.key,
                ),
            ).rowcount  # fmt: skip
            if updated != 1:
                raise StoreError(
                    f"arm {arm!r} has no problem {result.problem_id!r} (seed {result.seed}, repeat {result.repeat})"
                )

    def update_grades(self, arm: str, graded: Iterable[ProblemResult]) -> list[ProblemResult]:
        """Rewrite the extracted answer, grade and grade note of done results of ``arm``, in one transaction.

        Each is written only while its row still holds the answer it was graded from (a
        ``pacore run`` working on the run meanwhile may have redone it). Nothing else of
        the result changes (not ``updated_at``: it was not run again). Returns those written.
        """
        written = []
        with self.transaction() as db:
            for result in graded:
                updated = db.execute(
                    "UPDATE results SET extracted = ?, correct = ?, grade_note = ? "
                    "WHERE arm = ? AND problem_id = ? AND seed = ? AND repeat = ? AND status = 'done' AND answer IS ?",
                    (
                        result.extracted, None if result.correct is None else int(result.correct), result.grade_note,
                        arm, *result.key, result.answer,
                    ),
                ).rowcount  # fmt: skip
                if updated:
                    written.append(result)
        return written

    def results(self, arm: str, *, traces: bool = True) -> Iterator[ProblemResult]:
        """Every result of ``arm`` in data set order (then seed and repeat), with traces unless ``traces=False``.

        A generator: a large run's traces are read one result at a time.
        """
        columns = _RESULT_COLUMNS + (", r.trace_json" if traces else ", NULL AS trace_json")
        rows = self.db.execute(
            f"SELECT {columns} FROM results r JOIN problems p USING (problem_id) WHERE r.arm = ? "
            "ORDER BY p.position, r.rowid",
            (arm,),
        )
        for row in rows:
            yield _result(row)

    def result(
        self, arm: str, problem_id: str, seed: int | None = None, repeat: int | None = None
    ) -> ProblemResult | None:
        """One result of ``arm`` with its trace: ``problem_id``'s first, or the ``seed`` / ``repeat`` given."""
        row = self.db.execute(
            f"SELECT {_RESULT_COLUMNS}, r.trace_json FROM results r WHERE r.arm = ? AND r.problem_id = ? "
            "AND (? IS NULL OR r.seed = ?) AND (? IS NULL OR r.repeat = ?) ORDER BY r.rowid LIMIT 1",
            (arm, problem_id, seed, seed, repeat, repeat),
        ).fetchone()
        return _result(row) if row is not None else None

    # --- trajectory pool -----------------------------------------------

    def pool(self, problem_id: str) -> list[Trajectory]:
        """The pooled first-round trajectories of a problem, by index."""
        rows = self.db.execute("SELECT trajectory_json FROM pool WHERE problem_id = ? ORDER BY idx", (problem_id,))
        return [Trajectory.model_validate_json(row["trajectory_json"]) for row in rows]

    def add_pool(self, problem_id: str, trajectories: Iterable[Trajectory]) -> None:
        """Add trajectories to a problem's pool (keyed by their ``index``), in one transaction."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO pool (problem_id, idx, trajectory_json, created_at) VALUES (?, ?, ?, ?)",
                [(problem_id, t.index, t.model_dump_json(), now_iso()) for t in trajectories],
            )

    def pool_counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT problem_id, COUNT(*) AS n FROM pool GROUP BY problem_id")
        return {row["problem_id"]: row["n"] for row in rows}


_RESULT_COLUMNS = ", ".join(
    f"r.{name}"
    for name in (
        "problem_id", "status", "answer", "extracted", "correct", "prompt_tokens",
        "completion_tokens", "calls", "wall_s", "error", "attempts", "seed", "repeat", "updated_at", "grade_note",
    )
)  # fmt: skip


def _add_repeats(db: sqlite3.Connection, arm: str, problem_ids: Iterable[str], seed: int, repeats: int) -> int:
    cursor = db.executemany(
        "INSERT OR IGNORE INTO results (arm, problem_id, seed, repeat, status) VALUES (?, ?, ?, ?, 'pending')",
        [(arm, problem_id, seed, repeat) for problem_id in problem_ids for repeat in range(repeats)],
    )
    return cursor.rowcount


def _result(row: sqlite3.Row) -> ProblemResult:
    trace = row["trace_json"]
    return ProblemResult(
        problem_id=row["problem_id"],
        status=row["status"],
        answer=row["answer"],
        extracted=row["extracted"],
        correct=None if row["correct"] is None else bool(row["correct"]),
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        calls=row["calls"],
        wall_s=row["wall_s"],
        error=row["error"],
        trace=Result.model_validate_json(trace) if trace else None,
        attempts=row["attempts"],
        seed=row["seed"],
        repeat=row["repeat"],
        updated_at=row["updated_at"],
        grade_note=row["grade_note"],
    )


def _lock(run_dir: Path) -> int:
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "ignore").strip()
        os.close(fd)
        who = f" (pid {holder})" if holder else ""
        raise StoreError(f"{run_dir} is in use by another pacore run{who}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
    return fd


def _set_aside(path: Path) -> Path | None:
    """Rename a database (WAL checkpointed first, so the file is complete alone)."""
    if not path.exists():
        return None
    db = sqlite3.connect(path, isolation_level=None, factory=CheckedConnection)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"run.replaced-{stamp}.sqlite")
    path.replace(target)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return target


def store_files(run_dir: Path) -> dict[Path, str]:
    """The files of ``run_dir`` the store owns or may create (database, journals, lock, set-aside databases)."""
    run_dir = Path(run_dir)
    names = [DB_NAME, *(DB_NAME + suffix for suffix in ("-wal", "-shm", "-journal")), LOCK_NAME]
    paths = [run_dir / name for name in names] + sorted(run_dir.glob("run.*"))
    return {
        path: f"the run database of {run_dir}" if path.name == DB_NAME else f"a file of run directory {run_dir}"
        for path in paths
    }
