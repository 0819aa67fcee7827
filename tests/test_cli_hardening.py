"""Hostile but ordinary inputs to every ``pacore`` command: one line, a documented exit code, nothing lost.

- outputs never replace inputs (the run database, the run's files, the data set),
  whatever the path spelling (``./x``, symlinks, hard links), and are written atomically;
- any bytes in arguments and on stdin, any file (device, FIFO, directory, huge),
  any run database state (not a database, damaged page, newer schema, locked,
  read-only) give one line and exit 1 or 2, never a traceback;
- a property test runs every command on generated junk;
- Ctrl-C on ``pacore ask`` keeps the finished rounds (exit 130).

Answers come from ``bench/fastbackend.py`` on loopback. Most cases run the
command in-process through :func:`pacore.cli.main.main` (fast enough for
hypothesis); real argv bytes, closed or endless stdin and signals need a
subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_harness import CLEAN_ENV, error_line, invoke
from harness import FastBackend, fast_backend
from pacore.cli.main import EXIT_CODES
from pacore.database import CheckedConnection
from pacore.errors import InputError, OutputError, StoreError, StoreUnusableError
from pacore.files import atomic_output, read_input, write_atomic
from pacore.store import RunStore

pytestmark = pytest.mark.http


def subprocess_pacore(*args: str | bytes, stdin: int | bytes | None = b"", timeout: float = 60) -> tuple[int, str, str]:
    """Run ``python -m pacore ARGS`` with real argv bytes; ``stdin``: bytes, a file descriptor or None (closed)."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    command = [sys.executable, "-m", "pacore", *args]
    if stdin is None:  # a closed file descriptor 0, as with `pacore ask - <&-`
        stdin_arg, preexec = subprocess.DEVNULL, lambda: os.close(0)
        data = None
    elif isinstance(stdin, int):
        stdin_arg, preexec, data = stdin, None, None
    else:
        stdin_arg, preexec, data = None, None, stdin
    process = subprocess.run(
        command, stdin=stdin_arg, input=data, capture_output=True, timeout=timeout, env=env, preexec_fn=preexec
    )
    return process.returncode, process.stdout.decode("utf-8", "replace"), process.stderr.decode("utf-8", "replace")


def assert_one_line_error(outcome: tuple[int, str, str], code: int, fragment: str) -> None:
    returncode, _, stderr = outcome
    assert fragment.lower() in error_line(stderr).lower()
    assert returncode == code, (returncode, stderr)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server() -> Iterator[FastBackend]:
    with fast_backend("--completion-tokens", 6) as running:
        yield running


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    records = [{"id": f"p{i}", "prompt": f"{i}+1?", "answer": str(i + 1)} for i in range(3)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, server: FastBackend, data_file: Path) -> Path:
    """A run directory with one finished arm and its report (left untouched by the tests that use it)."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    code, _, stderr = invoke("run", str(data_file), "--out", str(run_dir), "-b", server.url, "-s", "2", "-q")
    assert code == 0, stderr
    assert invoke("report", str(run_dir))[0] == 0
    return run_dir


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run (databases copied whole, WAL folded in)."""
    copy = tmp_path / "run"
    copy.mkdir()
    with sqlite3.connect(finished_run / "run.sqlite") as source, sqlite3.connect(copy / "run.sqlite") as target:
        source.backup(target)
    return copy


# --- outputs never replace inputs ----------------------------------------------


def _out_spellings(run_dir: Path, data: Path, tmp: Path) -> dict[str, Path]:
    database = run_dir / "run.sqlite"
    (tmp / "link.jsonl").symlink_to(database)
    os.link(database, tmp / "hard.jsonl")
    (tmp / "data-link.jsonl").symlink_to(data)
    return {
        "the database": database,
        "the database via ./..": run_dir / "." / ".." / run_dir.name / "run.sqlite",
        "a symlink to the database": tmp / "link.jsonl",
        "a hard link to the database": tmp / "hard.jsonl",
        "the lock file": run_dir / "run.lock",
        "the report": run_dir / "report.md",
        "the data set": data,
        "a symlink to the data set": tmp / "data-link.jsonl",
    }


def test_export_train_refuses_every_spelling_of_an_input(run_copy: Path, data_file: Path, tmp_path: Path) -> None:
    invoke("report", str(run_copy))  # so that report.md exists
    before = {path: digest(path) for path in (run_copy / "run.sqlite", data_file, run_copy / "report.md")}
    for name, out in _out_spellings(run_copy, data_file, tmp_path).items():
        outcome = invoke("export-train", str(run_copy), "--out", str(out))
        assert_one_line_error(outcome, 2, "refusing to write")
        assert outcome[1] == "", name
    assert {path: digest(path) for path in before} == before
    # Beside the inputs, a new file in the run directory is fine (and can be rewritten).
    for _ in range(2):
        assert invoke("export-train", str(run_copy), "--out", str(run_copy / "train.jsonl"), "--min-acc", "-1")[0] == 0


def test_report_refuses_to_write_over_an_input(run_copy: Path, data_file: Path, tmp_path: Path) -> None:
    before = digest(run_copy / "run.sqlite")
    elsewhere = tmp_path / "reports"
    elsewhere.mkdir()
    os.link(run_copy / "run.sqlite", elsewhere / "report.html")  # a hard link named like a report file
    assert_one_line_error(invoke("report", str(run_copy), "--out", str(elsewhere)), 2, "the run database")
    assert_one_line_error(invoke("report", str(run_copy), "--out", str(data_file)), 2, "not a directory")
    assert digest(run_copy / "run.sqlite") == before
    # Its own files in the run directory it may replace.
    assert invoke("report", str(run_copy))[0] == 0
    assert invoke("report", str(run_copy))[0] == 0


def test_data_synth_refuses_a_run_database(run_copy: Path) -> None:
    before = digest(run_copy / "run.sqlite")
    assert_one_line_error(invoke("data", "synth", "--out", str(run_copy / "run.sqlite")), 2, "run database")
    assert digest(run_copy / "run.sqlite") == before


def test_data_get_refuses_to_write_over_its_source(tmp_path: Path) -> None:
    source = tmp_path / "gsm8k-mirror.jsonl"
    source.write_text(json.dumps({"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}) + "\n")
    before = digest(source)
    env_cache = {"PACORE_CACHE_DIR": str(tmp_path / "cache")}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env_cache.items():
            patch.setenv(name, value)
        outcome = invoke("data", "get", "gsm8k", "--from", str(source), "--out", str(source), "--force")
        assert_one_line_error(outcome, 2, "the source file")
        assert digest(source) == before
        assert invoke("data", "get", "gsm8k", "--from", str(source), "--out", str(tmp_path / "g.jsonl"))[0] == 0
        huge = tmp_path / "huge.jsonl"
        with huge.open("wb") as file:  # sparse; refused by its size, not read and hashed
            file.truncate(3_000_000)
        outcome = invoke(
            "data", "get", "gsm8k", "--from", str(huge), "--out", str(tmp_path / "h.jsonl"), "--max-mb", "1"
        )
        assert_one_line_error(outcome, 2, "is more than the 1.0 MB limit")


@pytest.mark.parametrize(
    "args",
    [
        ["run", "{data}", "--out", "", "-b", "{url}"],
        ["report", "{run}", "--out", ""],
        ["export-train", "{run}", "--out", "  "],
        ["data", "synth", "--out", ""],
        ["data", "get", "gsm8k", "--out", ""],
    ],
    ids=["run", "report", "export-train", "data synth", "data get"],
)
def test_an_empty_out_is_a_usage_error(
    args: list[str], finished_run: Path, data_file: Path, server: FastBackend
) -> None:
    values = {"data": str(data_file), "url": server.url, "run": str(finished_run)}
    assert_one_line_error(invoke(*(arg.format(**values) for arg in args)), 2, "the path is empty")


def test_atomic_output_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_output(target) as file:
        file.write("half of the new content")
        raise RuntimeError("the disk caught fire")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temporary file left


def test_atomic_output_gives_normal_permissions_and_replaces_a_symlink_not_its_target(tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("keep me")
    link = tmp_path / "link.txt"
    link.symlink_to(other)
    write_atomic(link, "new")
    assert other.read_text() == "keep me"
    assert link.read_text() == "new" and not link.is_symlink()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(link.stat().st_mode) == 0o666 & ~umask
    private = tmp_path / "private.txt"
    private.write_text("secret")
    private.chmod(0o600)
    write_atomic(private, "still secret")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600  # a replaced file keeps its mode
    with pytest.raises(OutputError, match="is a directory"):
        write_atomic(tmp_path, "x")


def test_devices_and_pipes_are_written_in_place_never_replaced(tmp_path: Path, finished_run: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    code, _, stderr = invoke("export-train", str(finished_run), "--out", str(fifo), "--min-acc", "-1")
    assert code == 0, stderr
    assert json.loads(reader.communicate(timeout=10)[0].splitlines()[0])["id"] == "p0"
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # still a FIFO, not a regular file renamed over it
    assert invoke("export-train", str(finished_run), "--out", "/dev/null")[0] == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


# --- inputs: bytes, streams, files ---------------------------------------------


def test_invalid_utf8_arguments_and_stdin_are_refused_in_one_line(server: FastBackend) -> None:
    url = server.url
    assert_one_line_error(subprocess_pacore("ask", b"\xff\xfe what?", "-b", url), 2, "argument 2 is not valid UTF-8")
    assert_one_line_error(subprocess_pacore("ask", "q", "--system", b"be \xc3", "-b", url), 2, "not valid UTF-8")
    assert_one_line_error(subprocess_pacore("ask", "-", "-b", url, stdin=b"what \xff?"), 2, "stdin is not valid UTF-8")


def test_closed_and_endless_stdin(server: FastBackend) -> None:
    assert_one_line_error(subprocess_pacore("ask", "-", "-b", server.url, stdin=None), 2, "stdin: it is closed")
    with open("/dev/zero", "rb") as zero:
        assert_one_line_error(subprocess_pacore("ask", "-", "-b", server.url, stdin=zero.fileno()), 2, "limit")


def test_closed_stdout_is_refused_before_any_work(server: FastBackend) -> None:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    process = subprocess.run(
        [sys.executable, "-m", "pacore", "ask", "q", "--json", "-b", server.url], stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1), env=env, timeout=60,
    )  # fmt: skip
    assert_one_line_error((process.returncode, "", process.stderr.decode()), 2, "stdout is closed")


@pytest.fixture
def odd_files(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.jsonl"
    with huge.open("wb") as file:  # sparse: big by size, no disk used
        file.truncate(600 * 1024 * 1024)
    return {"zero": Path("/dev/zero"), "fifo": fifo, "directory": tmp_path, "huge": huge, "missing": tmp_path / "nope"}


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("zero", "not a regular file or a pipe"),
        ("fifo", "holds no problems"),  # nobody writes to it: read as empty, never blocks
        ("directory", "is a directory"),
        ("huge", "larger than the 512 MiB limit"),
        ("missing", "not found"),
    ],
)
def test_odd_data_set_files(
    kind: str, fragment: str, odd_files: dict[str, Path], server: FastBackend, tmp_path: Path
) -> None:
    path = str(odd_files[kind])
    assert_one_line_error(invoke("data", "check", path), 2, fragment)
    assert_one_line_error(invoke("run", path, "--out", str(tmp_path / "r"), "-b", server.url), 2, fragment)


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [("zero", "not a regular file"), ("fifo", "empty"), ("directory", "is a directory"), ("missing", "not found")],
)
def test_odd_image_files(kind: str, fragment: str, odd_files: dict[str, Path], server: FastBackend) -> None:
    assert_one_line_error(invoke("ask", "q", "--image", str(odd_files[kind]), "-b", server.url), 2, fragment)


def test_images_are_read_up_to_a_limit(tmp_path: Path, server: FastBackend) -> None:
    image = tmp_path / "big.png"
    with image.open("wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n")
        file.truncate(20 * 1024 * 1024 + 1)
    outcome = invoke("ask", "q", "--image", str(image), "-b", server.url)
    assert_one_line_error(outcome, 2, "larger than the 20 MiB limit")


def test_pipes_are_read_with_a_bound(tmp_path: Path) -> None:
    # A pipe has no size to check first: it is read up to the limit, then refused.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"head -c 5000 /dev/zero > {fifo}"])
    try:
        # Wait for the writer to open its end, else the FIFO reads as empty.
        with open(fifo, "rb") as first:  # blocks until the writer is there; keeps it from seeing EOF
            with pytest.raises(InputError, match="larger than the 1000 bytes limit"):
                read_input(fifo, limit=1000, what="file")
            first.read()
    finally:
        writer.kill()
        writer.wait(timeout=10)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["data", "synth", "--out", "{tmp}/s.jsonl", "--digits", "4000-5000"], "<= 100"),
        (["data", "synth", "--out", "{tmp}/s.jsonl", "--digits", "1-" + "9" * 5000], "must look like"),
        (["data", "synth", "--out", "{tmp}/s.jsonl", "--count", "9" * 40], "count must be from 1 to"),
        (["ask", "q", "--api-key", "kéy", "-b", "{url}"], "printable ASCII"),
        (["run", "{data}", "--out", "{tmp}/r", "--pool-size", "100000000", "-b", "{url}"], "--pool-size must be"),
        (
            ["run", "{data}", "--out", "{tmp}/r", "--method", "majority", "--samples", "10000000", "-b", "{url}"],
            "--samples must be at most",
        ),
    ],
    ids=["digits", "digits past int parsing", "count", "api key", "pool size", "samples"],
)
def test_out_of_range_arguments(
    args: list[str], fragment: str, tmp_path: Path, server: FastBackend, data_file: Path
) -> None:
    outcome = invoke(*(arg.format(tmp=tmp_path, url=server.url, data=data_file) for arg in args))
    assert_one_line_error(outcome, 2, fragment)
    assert len(outcome[2]) < 300  # the offending value is not echoed at length
    assert not (tmp_path / "r").exists()  # refused before any work


class LoneSurrogateServer(ThreadingHTTPServer):
    """An OpenAI-compatible server whose every answer holds a lone surrogate escape, as some servers send."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), LoneSurrogateHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class LoneSurrogateHandler(BaseHTTPRequestHandler):
    ANSWER = (
        b'{"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [{"index": 0, '
        b'"message": {"role": "assistant", "content": "half a pair \\ud800 here"}, "finish_reason": "stop"}], '
        b'"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}'
    )

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.ANSWER)))
        self.end_headers()
        self.wfile.write(self.ANSWER)

    def log_message(self, *args: object) -> None:
        pass


def test_a_lone_surrogate_from_the_backend_is_replaced_not_a_crash(data_file: Path, tmp_path: Path) -> None:
    server = LoneSurrogateServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, stdout, stderr = invoke("ask", "q", "-b", server.url, "-m", "m", "-s", "1", "--json", "-q")
        assert code == 0, stderr
        trace = json.loads(stdout)
        assert trace["answer"] == "half a pair \ufffd here"
        # The synthesis call received the reference and the run stores it.
        run_dir = str(tmp_path / "r")
        code, _, stderr = invoke("run", str(data_file), "--out", run_dir, "-b", server.url, "-m", "m", "-s", "1", "-q")
        assert code == 0, stderr
    finally:
        server.shutdown()
        server.server_close()


# --- run database states --------------------------------------------------------


def _damage_a_page(database: Path) -> None:
    data = bytearray(database.read_bytes())
    pages = len(data) // 4096
    assert pages >= 4
    for page in range(2, pages):  # leave the header page, so that the file still opens
        data[page * 4096 : (page + 1) * 4096] = b"\xa5" * 4096
    database.write_bytes(bytes(data))


STATES = {
    "not a database": (lambda db: db.write_bytes(b"this is not a database" * 10), 2, "not a SQLite database"),
    "truncated": (lambda db: db.write_bytes(db.read_bytes()[:1000]), 2, "run database"),
    "damaged page": (_damage_a_page, 2, "is damaged"),
    "newer schema": (
        lambda db: sqlite3.connect(db, isolation_level=None).execute(
            "INSERT INTO schema_migrations VALUES ('m999_from_the_future', 'x')"
        ),
        2,
        "written by a newer pacore",
    ),
    "another program's database": (
        lambda db: (db.unlink(), sqlite3.connect(db, isolation_level=None).execute("CREATE TABLE notes (x TEXT)")),
        2,
        "database of another program",
    ),
}


@pytest.mark.parametrize("state", list(STATES))
def test_every_command_on_an_unusable_run_database(
    state: str, run_copy: Path, data_file: Path, server: FastBackend, tmp_path: Path
) -> None:
    spoil, code, fragment = STATES[state]
    spoil(run_copy / "run.sqlite")
    for args in (
        ["report", str(run_copy), "--out", str(tmp_path / "report")],
        ["export-train", str(run_copy), "--out", str(tmp_path / "t.jsonl")],
        ["run", str(data_file), "--out", str(run_copy), "-b", server.url, "-s", "2", "-q"],
    ):
        assert_one_line_error(invoke(*args), code, fragment)


def test_a_run_directory_in_use_by_another_writer(run_copy: Path, data_file: Path, server: FastBackend) -> None:
    with RunStore.open(run_copy, writer=True):
        outcome = invoke("run", str(data_file), "--out", str(run_copy), "-b", server.url, "-s", "2", "-q")
    assert_one_line_error(outcome, 1, "in use by another pacore run")


def test_a_read_only_database_is_one_line_error(run_copy: Path) -> None:
    # Root ignores file modes, so the database is opened read-only through SQLite itself.
    uri = f"file:{run_copy / 'run.sqlite'}?mode=ro"
    db = sqlite3.connect(uri, uri=True, isolation_level=None, factory=CheckedConnection)
    with pytest.raises(StoreUnusableError, match="is read-only"):
        db.execute("UPDATE results SET attempts = attempts + 1")
    db.close()


def test_a_locked_database_is_a_runtime_error(run_copy: Path) -> None:
    holder = sqlite3.connect(run_copy / "run.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        db = sqlite3.connect(run_copy / "run.sqlite", timeout=0.1, isolation_level=None, factory=CheckedConnection)
        with pytest.raises(StoreError, match="locked by another process") as caught:  # WAL: readers still read
            db.execute("UPDATE results SET attempts = attempts + 1")
        assert not isinstance(caught.value, StoreUnusableError)  # exit 1: try again later
        db.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# --- every command on generated junk --------------------------------------------

# Text as argv can carry it: no NUL; lone surrogates are what invalid UTF-8 bytes become.
junk_text = st.one_of(
    st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=24),
    st.sampled_from(["", " ", "-", "--", "-1", "0", "nan", "inf", "1e999", "9" * 60, "\udcff", "a\udcc3b", "../", "/"]),
)
RECORD_KEYS = ["id", "prompt", "question", "answer", "messages", "kind"]
junk_records = st.lists(
    st.one_of(st.dictionaries(st.sampled_from(RECORD_KEYS), junk_text, max_size=4), junk_text, st.integers()),
    max_size=3,
).map(lambda records: "\n".join(json.dumps(r) for r in records).encode())
junk_file_content = st.one_of(st.binary(max_size=300), junk_records)

ASK_OPTIONS = ["--image", "--system", "--schedule", "--max-tokens", "--temperature", "--top-p", "--seed",
               "--deadline", "--min-success", "--timeout", "--retries", "--model"]  # fmt: skip
RUN_OPTIONS = ["--method", "--schedule", "--samples", "--pool-size", "--concurrency", "--limit", "--offset"]
EXPORT_OPTIONS = ["--min-acc", "--max-acc", "--min-size", "--max-size", "--seed", "--arm"]
SYNTH_OPTIONS = ["--count", "--digits", "--ops", "--seed"]


@pytest.fixture(scope="module")
def junk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("junk")
    os.mkfifo(base / "fifo")
    (base / "damaged").mkdir()
    (base / "damaged" / "run.sqlite").write_bytes(b"SQLite format 3\0" + b"\xff" * 200)
    return base


def options(names: list[str], values: st.SearchStrategy[str], most: int) -> st.SearchStrategy[list[str]]:
    """Up to ``most`` of the options ``names``, each with a drawn value, flattened."""
    pair = st.tuples(st.sampled_from(names), values).map(list)
    return st.lists(pair, max_size=most).map(lambda pairs: [arg for p in pairs for arg in p])


def command_lines(junk_dir: Path, finished_run: Path, url: str) -> st.SearchStrategy[list[str]]:
    files = st.sampled_from(
        [str(junk_dir / name) for name in ("junk.jsonl", "junk.json", "fifo", "damaged", "missing")]
        + [str(junk_dir), "/dev/zero", "/dev/null", str(finished_run), str(finished_run / "run.sqlite"), ""]
    )
    text = st.one_of(junk_text, files)
    # Answers come from the fast backend: never the embedded model.
    ask = st.tuples(st.one_of(junk_text, st.just("-")), options(ASK_OPTIONS, text, 3),
                    st.sampled_from([[], ["--json"], ["-q"]]))  # fmt: skip
    run = st.tuples(files, st.one_of(files, st.just(str(junk_dir / "newrun"))), options(RUN_OPTIONS, junk_text, 2))
    report = st.tuples(st.lists(files, min_size=1, max_size=2), st.lists(files, max_size=1))
    export_out = st.one_of(files, st.just(str(junk_dir / "train.jsonl")))
    export = st.tuples(files, export_out, options(EXPORT_OPTIONS, junk_text, 2))
    synth = options(SYNTH_OPTIONS, junk_text, 2)
    return st.one_of(
        ask.map(lambda t: ["ask", t[0], *t[1], *t[2], "-b", url]),
        run.map(lambda t: ["run", t[0], "--out", t[1], *t[2], "-q", "-b", url]),
        report.map(lambda t: ["report", *t[0], *(["--out", *t[1]] if t[1] else [])]),
        export.map(lambda t: ["export-train", t[0], "--out", t[1], *t[2]]),
        files.map(lambda f: ["data", "check", f]),
        synth.map(lambda opts: ["data", "synth", "--out", str(junk_dir / "synth.jsonl"), *opts]),
        # Always --from a local file: never the network.
        st.tuples(st.one_of(st.sampled_from(["gsm8k", "math500", "aime2024"]), junk_text), files, text).map(
            lambda t: ["data", "get", t[0], "--from", t[1] or "missing", "--out", t[2], "--force"]
        ),
        # Never 'model prepare' (it assembles the model)...
        st.lists(junk_text, max_size=2).map(lambda rest: ["model", *rest] if rest[:1] != ["prepare"] else ["model"]),
        # ... and never a 'serve' that starts: an invalid --port stops it at argument parsing.
        st.lists(text, max_size=3).map(lambda rest: ["serve", *rest, "--port", "not-a-port"]),
        st.lists(text, max_size=4),
    )


@pytest.mark.slow
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_no_command_gives_a_traceback_on_junk(
    data: st.DataObject, junk_dir: Path, finished_run: Path, server: FastBackend
) -> None:
    (junk_dir / "junk.jsonl").write_bytes(data.draw(junk_file_content, label="junk.jsonl"))
    (junk_dir / "junk.json").write_bytes(data.draw(junk_file_content, label="junk.json"))
    args = data.draw(command_lines(junk_dir, finished_run, server.url), label="argv")
    stdin = data.draw(st.binary(max_size=64), label="stdin")
    before = digest(finished_run / "run.sqlite")
    os.environ["PACORE_CACHE_DIR"] = str(junk_dir / "cache")  # hypothesis forbids monkeypatch here
    try:
        code, _, stderr = invoke(*args, stdin=stdin)
    finally:
        del os.environ["PACORE_CACHE_DIR"]
    assert "Traceback" not in stderr
    assert "internal error" not in stderr, stderr
    assert code in EXIT_CODES, (code, stderr)
    if code != 0:
        assert stderr.splitlines()[-1].startswith(("pacore: error: ", "Usage:")), stderr
    assert digest(finished_run / "run.sqlite") == before  # junk never changes a finished run's results


# --- Ctrl-C keeps the finished rounds -------------------------------------------


@pytest.fixture(scope="module")
def slow_server() -> Iterator[FastBackend]:
    # Slow enough that the final round is still running when the signal comes, even if the
    # signal is a second or two late on a loaded machine.
    with fast_backend("--completion-tokens", 6, "--ttft-ms", 4000) as running:
        yield running


def interrupt_after_round_1(*extra: str, url: str) -> tuple[int, str, list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    process = subprocess.Popen(
        [sys.executable, "-m", "pacore", "ask", "What is 2+3?", "-b", url, "-s", "2", "--retries", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job may inherit SIG_IGN
    )  # fmt: skip
    assert process.stderr is not None
    lines = []
    for line in process.stderr:  # plain progress: one line per finished round
        lines.append(line.rstrip("\n"))
        if line.startswith("round 1/2"):
            process.send_signal(signal.SIGINT)
            break
    stdout, rest = process.communicate(timeout=60)
    return process.returncode, stdout, lines + rest.splitlines()


def test_ctrl_c_on_ask_json_prints_the_partial_trace(slow_server: FastBackend) -> None:
    code, stdout, stderr = interrupt_after_round_1("--json", url=slow_server.url)
    assert code == 130, stderr
    assert "Traceback" not in "\n".join(stderr)
    assert stderr[-1] == "pacore: error: interrupted"
    trace = json.loads(stdout)
    assert trace["error"] == "interrupted"
    assert trace["answer"] == ""
    first = trace["rounds"][0]
    assert len(first["trajectories"]) == 2 and all(t["message"] for t in first["trajectories"])
    assert trace["usage"]["calls"] == 2


def test_ctrl_c_on_ask_prints_what_the_finished_rounds_cost(slow_server: FastBackend) -> None:
    code, stdout, stderr = interrupt_after_round_1(url=slow_server.url)
    assert code == 130
    assert stdout == ""
    assert stderr[-2].startswith("2 rounds, 2 calls, 12 effective TTC tokens"), stderr
    assert stderr[-1] == "pacore: error: interrupted"
