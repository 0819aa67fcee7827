"""Generic SQLite helpers shared by pacore's databases (the run store, the server's history).

A connection with pacore's durability settings (:func:`connect`), one write
:func:`transaction` at a time, an ordered-migrations runner (:func:`migrate`:
each migration a small function, applied once and recorded in
``schema_migrations``, in the manner of simonw/llm), and a connection whose
"database unusable" errors become one-line pacore errors (:class:`CheckedConnection`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pacore.errors import StoreError, StoreUnusableError

#: One schema change: a function run once inside its own transaction.
Migration = Callable[[sqlite3.Connection], None]


def now_iso() -> str:
    """Now in UTC, ISO 8601 to the millisecond (reports derive a run's wall time from these)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on ``db``, rolled back if anything fails (its commit included)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        # SQLite rolls a transaction back itself on some errors (a full disk, an I/O error): a
        # second ROLLBACK would fail and hide the error that says what happened.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def migrate(db: sqlite3.Connection, migrations: Iterable[Migration]) -> list[str]:
    """Apply the ``migrations`` not yet recorded in ``db``, each in its own transaction; returns their names."""
    where = getattr(db, "path", "the database")
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables and "schema_migrations" not in tables:  # never add pacore's tables to someone else's database
        shown = ", ".join(sorted(tables)[:5])
        raise StoreUnusableError(f"{where} is a SQLite database of another program (tables: {shown})")
    db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    applied = applied_migrations(db)
    unknown = applied - {function.__name__ for function in migrations}
    if unknown:
        raise StoreUnusableError(
            f"{where} has schema changes pacore {_version()} does not know ({min(unknown)}): it was "
            "written by a newer pacore (upgrade to use it) or is another kind of database"
        )
    newly: list[str] = []
    for function in migrations:
        if function.__name__ in applied:
            continue
        with transaction(db):
            function(db)
            db.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (function.__name__, now_iso()))
        newly.append(function.__name__)
    return newly


def applied_migrations(db: sqlite3.Connection) -> set[str]:
    return {row["name"] for row in db.execute("SELECT name FROM schema_migrations")}


#: Seconds a statement waits for another connection's lock (a run committing) before "is locked by another process".
BUSY_TIMEOUT_S = 30.0


def connect(path: Path, factory: type[sqlite3.Connection] = sqlite3.Connection) -> sqlite3.Connection:
    """A connection to the database at ``path`` with the store's durability settings."""
    # Written from a worker thread (batch runs, the server history), not the one that opened it.
    db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S, check_same_thread=False, factory=factory)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit survives power loss too, not only a killed process;
    # commits are per problem, so the fsync costs nothing noticeable.
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


# SQLite's primary result codes that say the database file itself is unusable or
# unavailable, with how to say so (https://www.sqlite.org/rescode.html).
_UNUSABLE = {
    3: "is not accessible (permission denied)",  # SQLITE_PERM
    8: "is read-only",  # SQLITE_READONLY
    11: "is damaged (corrupt pages); restore it from a copy or move it away to start over",  # SQLITE_CORRUPT
    14: "cannot be opened",  # SQLITE_CANTOPEN
    26: "is not a SQLite database (truncated or overwritten?)",  # SQLITE_NOTADB
}
_UNAVAILABLE = {
    5: "is locked by another process",  # SQLITE_BUSY
    6: "is locked by another process",  # SQLITE_LOCKED
    10: "could not be read or written (I/O error)",  # SQLITE_IOERR
    13: "could not be written: the disk or database is full",  # SQLITE_FULL
}


def _translated(exc: sqlite3.Error, path: object) -> BaseException:
    """The one-line pacore error for a database that cannot be used, else ``exc`` itself."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in _UNUSABLE:
        return StoreUnusableError(f"run database {path} {_UNUSABLE[code]} ({exc})")
    if code in _UNAVAILABLE:
        return StoreError(f"run database {path} {_UNAVAILABLE[code]} ({exc})")
    return exc


class CheckedCursor(sqlite3.Cursor):
    """A cursor whose "database unusable" errors (on any query or fetch) become one-line pacore errors.

    A damaged page surfaces only when a query reaches it, possibly long after
    opening, so every call is checked, not just the connection's first.
    """

    def _check(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except sqlite3.Error as exc:
            raise _translated(exc, getattr(self.connection, "path", "")) from None

    def execute(self, *args: Any) -> CheckedCursor:
        return self._check(super().execute, *args)

    def executemany(self, *args: Any) -> CheckedCursor:
        return self._check(super().executemany, *args)

    def fetchone(self) -> Any:
        return self._check(super().fetchone)

    def fetchmany(self, *args: Any) -> list[Any]:
        return self._check(super().fetchmany, *args)

    def fetchall(self) -> list[Any]:
        return self._check(super().fetchall)

    def __next__(self) -> Any:
        return self._check(super().__next__)


class CheckedConnection(sqlite3.Connection):
    """The run store's connection: every cursor is a :class:`CheckedCursor`."""

    def __init__(self, database: Path, *args: Any, **kwargs: Any) -> None:
        self.path = database
        try:
            super().__init__(database, *args, **kwargs)
        except sqlite3.Error as exc:
            raise _translated(exc, database) from None

    def cursor(self, factory: Any = CheckedCursor) -> Any:
        return super().cursor(factory)

    # The C ``execute`` shortcuts do not go through ``cursor()``.
    def execute(self, *args: Any) -> Any:
        return self.cursor().execute(*args)

    def executemany(self, *args: Any) -> Any:
        return self.cursor().executemany(*args)


def _version() -> str:
    from pacore import __version__

    return __version__
