"""Every shell and Python example in README.md and docs/*.md runs.

Each ```bash / ```sh / ```shell and ```python block is one test (id
``FILE:LINE`` of its opening fence). It runs in a fresh temporary directory
holding ``.venv`` and ``bench`` links to this checkout, so the documented
``.venv/bin/python bench/...`` commands work: shell blocks with
``bash -euo pipefail`` and this interpreter's ``bin`` first on ``PATH``,
Python blocks with this interpreter, both with ``PYTHONPATH`` at ``src/``.
``pacore data get`` downloads from a loopback mirror (``PACORE_DATA_MIRROR``)
serving small fixtures in each source's published schema, into a cache of the
session's own (the embedded model is shared, not re-assembled).

Markers: an HTML comment on the lines right before the opening fence, one per
line (markdown renderers do not show them)::

    <!-- example: skip (REASON) -->   not run here (a GPU server, a cluster, the network...); the reason is required
    <!-- example: model -->           uses the embedded model (pytest marker ``model``); unmarked blocks cannot load it
    <!-- example: backend -->         every http(s)://HOST[:PORT]/v1 URL is replaced by the fast backend's
                                      (bench/fastbackend.py on loopback)
    <!-- example: setup COMMAND -->   a shell line run first, in the same shell for a shell block (repeatable)
    <!-- example: background -->      a server: started in the background with its ``--port N`` replaced by a
                                      free port (``pacore serve`` without ``--port`` gets one; N = 8000); once it
                                      answers HTTP, later blocks of the same page see 127.0.0.1:N pointing at it

Any other block that starts a server on a documented port (``--port N``, and ``N+1``... with
``--endpoints``) runs on free ports instead: ``--port N`` and its ``127.0.0.1:N`` / ``localhost:N``
URLs are moved together, so a port another process holds cannot fail or hang an example.

Anything else after ``example:`` is an error, and so is a skip without a reason.

Each block's shell runs in a process group of its own (:class:`ProcessGroup`) that is killed
when this process ends, however it ends: a killed pytest leaves no example's server running.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli_harness import free_port
from harness import fast_backend
from pacore.backends.llama_cpp import cache_dir as models_dir
from test_data_get import FileServer, _handler, catalogue_files

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
BLOCK_TIMEOUT_S = 600
SERVER_START_TIMEOUT_S = 180

LANGUAGES = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python", "py": "python"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*example:\s*(.*?)\s*-->\s*$")
SKIP = re.compile(r"^skip(?:\s*\((.*)\))?$")
URL = re.compile(r"https?://[A-Za-z0-9.\-]+(?::(?:\d+|PORT\d*))?/v1")
PORT_OPTION = re.compile(r"--port[ =](\d+)")
ENDPOINTS_OPTION = re.compile(r"--endpoints[ =](\d+)")
DEFAULT_SERVE_PORT = 8000


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str  # "shell" or "python"
    code: str
    skip: str | None = None  # the reason
    model: bool = False
    backend: bool = False
    background: bool = False
    setup: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_markers(block: Block, markers: list[str]) -> None:
    for text in markers:
        skip = SKIP.match(text)
        if skip:
            block.skip = (skip.group(1) or "").strip()
            if not block.skip:
                block.errors.append(f"{block.id}: 'skip' needs a reason: <!-- example: skip (why) -->")
        elif text in ("model", "backend", "background"):
            setattr(block, text, True)
        elif text.startswith("setup "):
            block.setup.append(text.removeprefix("setup ").strip())
        else:
            block.errors.append(f"{block.id}: unknown example marker {text!r}")


def extract_blocks(page: Path) -> list[Block]:
    """The shell and Python blocks of one markdown page, with their markers."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    at = 0
    while at < len(lines):
        opening = FENCE.match(lines[at])
        if not opening:
            at += 1
            continue
        indent, fence, language = opening.groups()
        end = at + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if language.lower() in LANGUAGES:
            body = [line.removeprefix(indent) for line in lines[at + 1 : end]]
            block = Block(page, at + 1, LANGUAGES[language.lower()], "\n".join(body) + "\n")
            markers: list[str] = []
            before = at - 1
            while before >= 0 and MARKER.match(lines[before]):
                markers.insert(0, MARKER.match(lines[before]).group(1))  # type: ignore[union-attr]
                before -= 1
            parse_markers(block, markers)
            blocks.append(block)
        at = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in extract_blocks(page)]


# ---------------------------------------------------------------------------
# What every block runs against


@pytest.fixture(scope="session")
def fast_backend_url() -> Iterator[str]:
    """bench/fastbackend.py on loopback: instant answers of 16 tokens."""
    with fast_backend("--completion-tokens", 16) as backend:
        yield backend.url


@pytest.fixture(scope="session")
def data_mirror() -> Iterator[str]:
    """A loopback mirror of every catalogue file (small fixtures in the published schemas)."""
    state = FileServer(files=catalogue_files())
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


Environment = Callable[[Block, Path], dict[str, str]]


@pytest.fixture(scope="session")
def environment(tmp_path_factory: pytest.TempPathFactory, data_mirror: str) -> Environment:
    """``environment(block, home)``: the variables a block runs with.

    A block marked ``model`` gets a cache whose ``models`` is the real one; any
    other block a cache where the embedded model cannot be assembled, so an
    example that uses it without the marker fails instead of being slow.
    """
    with_model = tmp_path_factory.mktemp("pacore-cache")
    models = models_dir()
    models.mkdir(parents=True, exist_ok=True)
    (with_model / "models").symlink_to(models, target_is_directory=True)
    without_model = tmp_path_factory.mktemp("pacore-cache-no-model")
    (without_model / "models").write_text("not a directory: mark the example <!-- example: model -->\n")
    env = {
        k: v for k, v in os.environ.items()
        if k not in ("PACORE_API_KEY", "OPENAI_API_KEY", "PACORE_SERVER_API_KEYS", "PACORE_DEBUG")
    }  # fmt: skip
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT / "src"),
        PACORE_DATA_MIRROR=data_mirror,
        NO_COLOR="1",
    )

    def for_block(block: Block, home: Path) -> dict[str, str]:
        cache = with_model if block.model else without_model
        return {**env, "PACORE_CACHE_DIR": str(cache), "HOME": str(home)}  # '~' stays in the workspace

    return for_block


def workspace(directory: Path) -> Path:
    """A directory where the documented repository-relative paths (.venv, bench) work."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    (directory / "bench").symlink_to(ROOT / "bench", target_is_directory=True)
    return directory


# The leader of a block's process group, alive until the group is stopped. When the process that
# started it ends, however it ends (SIGKILL, a timeout), the kernel sends it SIGHUP (Linux's
# PR_SET_PDEATHSIG) and it kills the whole group: the block's shell and the servers it started
# (a shell's children are not covered by a parent-death signal of the shell's own).
WATCHDOG = """
import ctypes, os, signal, sys
signal.signal(signal.SIGHUP, lambda *_: os.killpg(0, signal.SIGKILL))
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a teardown's SIGTERM is for the block; its SIGKILL ends this too
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGHUP) != 0:  # 1: PR_SET_PDEATHSIG
    sys.exit(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
if os.getppid() != int(sys.argv[1]):  # the parent ended before prctl
    os.killpg(0, signal.SIGKILL)
print("ready", flush=True)
while True:
    signal.pause()
"""


class ProcessGroup:
    """A new process group that is killed when this process ends, however it ends.

    Its leader is :data:`WATCHDOG`; the parent-death signal comes when the thread that
    created the group ends, so a group is created by the thread that owns it (pytest's).
    """

    def __init__(self) -> None:
        self.watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", WATCHDOG, str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, process_group=0,
        )  # fmt: skip
        assert self.watchdog.stdout is not None
        with self.watchdog.stdout:
            ready = self.watchdog.stdout.readline()
        if ready != "ready\n":
            self.watchdog.wait()
            raise RuntimeError(f"the process group's watchdog did not start (exit status {self.watchdog.returncode})")
        self.id = self.watchdog.pid

    def start(self, command: list[str], **options: Any) -> subprocess.Popen:
        """``command`` started in this group (``options`` as for :class:`subprocess.Popen`).

        Its input is empty, not a terminal: a process of a background group that reads one is stopped.
        """
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, process_group=self.id, **options)

    def stop(self, main: subprocess.Popen) -> None:
        """SIGTERM to the group, up to 10 s for ``main`` to end, then SIGKILL to what is left, the watchdog included."""
        # Until the watchdog is reaped its id is the group's, never another process's.
        if self.watchdog.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.id, signal.SIGTERM)  # the watchdog ignores it
                with contextlib.suppress(subprocess.TimeoutExpired):
                    main.wait(timeout=10)
                os.killpg(self.id, signal.SIGKILL)
            self.watchdog.wait()
        main.wait()


def outputs(directory: Path) -> str:
    """The ends of what a block wrote: its stdout and stderr, then the logs of servers it started (*.log, *.txt)."""
    files = [directory / "stdout.txt", directory / "stderr.txt"]
    files += sorted(p for p in [*directory.glob("*.log"), *directory.glob("*.txt")] if p not in files)
    return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}" for path in files if path.is_file())


@dataclass
class Server:
    block: Block
    documented_port: int
    port: int
    process: subprocess.Popen
    group: ProcessGroup
    log: Path


class Servers:
    """Background blocks, started on first need and stopped at the end of the session."""

    def __init__(self, root: Path, env: Environment, fast_url: str) -> None:
        self.root, self.env, self.fast_url = root, env, fast_url
        self.running: dict[str, Server] = {}

    def for_block(self, block: Block) -> Server | None:
        """The server of the last background block before ``block`` on its page, started."""
        earlier = [b for b in BLOCKS if b.page == block.page and b.background and b.line < block.line and not b.skip]
        return self.start(earlier[-1]) if earlier else None

    def start(self, block: Block) -> Server:
        if block.id in self.running:
            return self.running[block.id]
        port = free_port()
        ports = PORT_OPTION.findall(block.code)
        documented = int(ports[0]) if ports else DEFAULT_SERVE_PORT
        code = PORT_OPTION.sub(f"--port {port}", block.code)
        if not ports:
            code = code.replace("pacore serve", f"pacore serve --port {port}")
        directory = workspace(Path(tempfile.mkdtemp(prefix=f"{block.page.stem}-{block.line}-", dir=self.root)))
        (directory / "example.sh").write_text(render_shell(block, code, self.fast_url), encoding="utf-8")
        log = directory / "server.log"
        group = ProcessGroup()
        with log.open("w") as out:
            process = group.start(
                ["bash", "-euo", "pipefail", "example.sh"], cwd=directory, env=self.env(block, directory),
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)  # any answer: it listens
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            self.running[block.id] = Server(block, documented, port, process, group, log)
            return self.running[block.id]
        group.stop(process)
        status = process.returncode
        pytest.fail(f"{block.id}: no answer on port {port} (exit status {status}):\n{log.read_text()[-3000:]}")

    def stop_all(self) -> None:
        for server in self.running.values():
            server.group.stop(server.process)


@pytest.fixture(scope="session")
def servers(
    tmp_path_factory: pytest.TempPathFactory, environment: Environment, fast_backend_url: str
) -> Iterator[Servers]:
    started = Servers(tmp_path_factory.mktemp("servers"), environment, fast_backend_url)
    try:
        yield started
    finally:
        started.stop_all()


def port_is_free(port: int) -> bool:
    """Whether a loopback socket can bind ``port`` now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports nothing listens on (free when asked)."""
    for _ in range(100):
        first = free_port()
        if all(port_is_free(first + i) for i in range(1, count)):
            return first
    raise RuntimeError(f"no {count} consecutive free loopback ports in 100 tries")


def free_ports_for(block: Block) -> dict[int, int]:
    """Documented port -> free port for the servers a (non-background) block starts itself.

    A block's ``--endpoints K`` applies to its ``--port N``: ports N..N+K-1 are moved together.
    """
    documented = sorted({int(port) for port in PORT_OPTION.findall("\n".join([*block.setup, block.code]))})
    endpoints = ENDPOINTS_OPTION.search(block.code)
    count = int(endpoints.group(1)) if endpoints else 1
    moved: dict[int, int] = {}
    for port in documented:
        first = free_ports(count)
        moved.update((port + i, first + i) for i in range(count))
    return moved


PORT_OR_URL_PORT = re.compile(r"(--port[ =]|127\.0\.0\.1:|localhost:)(\d+)\b")


def move_ports(code: str, ports: dict[int, int]) -> str:
    """``code`` with each ``--port N`` and ``127.0.0.1:N`` / ``localhost:N`` of ``ports`` moved to its new port."""
    return PORT_OR_URL_PORT.sub(lambda m: m.group(1) + str(ports.get(int(m.group(2)), m.group(2))), code)


def on_free_ports(block: Block) -> Block:
    """``block`` with the servers it starts itself, and their URLs, moved to free ports."""
    ports = free_ports_for(block)
    return replace(block, code=move_ports(block.code, ports), setup=[move_ports(line, ports) for line in block.setup])


def substitute(block: Block, code: str, fast_url: str, server: Server | None) -> str:
    if block.backend:
        code = URL.sub(fast_url, code)
    elif server is not None:
        code = code.replace(f"127.0.0.1:{server.documented_port}", f"127.0.0.1:{server.port}")
    return code


def render_shell(block: Block, code: str, fast_url: str, server: Server | None = None) -> str:
    """The block's script: its setup lines, then its code, both with the URLs substituted."""
    return substitute(block, "\n".join([*block.setup, code]), fast_url, server)


# ---------------------------------------------------------------------------
# The tests


def test_the_pages_have_examples_and_every_marker_is_valid() -> None:
    assert len(BLOCKS) > 30, "the extraction found too few blocks"
    errors = [error for block in BLOCKS for error in block.errors]
    assert not errors, "\n".join(errors)


def test_every_skip_is_listed_with_its_reason() -> None:
    skipped = {block.id: block.skip for block in BLOCKS if block.skip is not None}
    print("\n".join(f"skipped {where}: {reason}" for where, reason in skipped.items()))
    assert all(skipped.values())
    # A skip is for what cannot run here; most blocks must run.
    assert len(skipped) < len(BLOCKS) / 4


def test_each_run_directory_belongs_to_one_example() -> None:
    """A reader may follow every page in one directory: two examples writing the same
    run directory would have the second refused (another data set or settings)."""
    users: dict[str, set[str]] = {}
    for block in BLOCKS:
        for name in set(re.findall(r"\bruns/[\w.,\-]+", block.code)):
            users.setdefault(name, set()).add(block.id)
    assert users, "no example writes a run directory"
    shared = {name: sorted(ids) for name, ids in users.items() if len(ids) > 1}
    assert not shared, f"run directories used by several examples: {shared}"


def test_examples_that_start_servers_run_on_free_ports() -> None:
    """The documented ports (another process may hold them) never reach a run, nor do their URLs."""
    starting = [b for b in BLOCKS if not b.background and not b.skip and PORT_OPTION.search(b.code)]
    assert starting, "no example starts a server on a documented port: drop this test"
    for block in starting:
        ports = free_ports_for(block)
        moved = on_free_ports(block)
        for documented, port in ports.items():
            assert documented != port and port_is_free(port), (block.id, documented, port)
            assert not re.search(rf"(--port[ =]|:){documented}\b", moved.code + "\n".join(moved.setup)), block.id
        assert len(PORT_OR_URL_PORT.findall(moved.code)) == len(PORT_OR_URL_PORT.findall(block.code)), block.id


# The examples' harness as pytest runs it, in a process of its own to be killed: it starts the
# server of background example argv[1], in argv[2], says where (port, process group) and waits.
HARNESS_TO_KILL = """
import os, sys, time
from pathlib import Path
import test_doc_examples as examples

block = next(b for b in examples.BLOCKS if b.id == sys.argv[1])
env = {**os.environ, "PATH": f"{examples.BIN}{os.pathsep}{os.environ['PATH']}"}
servers = examples.Servers(Path(sys.argv[2]), lambda block, home: {**env, "HOME": str(home)}, "http://127.0.0.1:9/v1")
server = servers.start(block)
print(server.port, server.group.id, flush=True)
time.sleep(600)
"""


def live_members(group: int) -> list[int]:
    """The processes of process group ``group`` still running (zombies left out: nothing may reap them here)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # ended meanwhile
            state, _parent, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(process_group) == group and state != "Z":
                members.append(int(stat.parent.name))
    return members


def listens(port: int) -> bool:
    """Whether something accepts connections on loopback ``port``."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@pytest.mark.http
def test_a_killed_pytest_leaves_no_example_server_behind(tmp_path: Path) -> None:
    """SIGKILL the process running the examples: the server a background example started, and its shell, end too."""
    block = next(b for b in BLOCKS if b.background and not (b.model or b.backend or b.skip))  # needs no fixture
    path = os.pathsep.join(str(ROOT / directory) for directory in ("tests", "bench", "src"))
    harness = subprocess.Popen(
        [sys.executable, "-c", HARNESS_TO_KILL, block.id, str(tmp_path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    group = None
    try:
        assert harness.stdout is not None
        with harness.stdout:
            started = harness.stdout.readline()
        assert started, f"the harness exited with status {harness.wait()} before {block.id} answered"
        port, group = map(int, started.split())
        assert listens(port) and len(live_members(group)) >= 3  # the watchdog, the shell, the server
        harness.kill()
        harness.wait()
        deadline = time.monotonic() + 10
        while (listens(port) or live_members(group)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not live_members(group), f"still running 10 s after the harness was killed: {live_members(group)}"
        assert not listens(port)
    finally:
        harness.kill()
        harness.wait()
        if group is not None and live_members(group):  # what outlived the harness when this failed
            os.killpg(group, signal.SIGKILL)


#: Pages with a background server: their later blocks use it.
SERVED_PAGES = {block.page for block in BLOCKS if block.background and not block.skip}


def worker_group(block: Block) -> str | None:
    """The pytest-xdist group of a block (``None``: any worker).

    The blocks of a page with a background server run on one worker, which starts that server once.
    """
    if block.page in SERVED_PAGES:
        return f"examples of {block.page.relative_to(ROOT)}"
    return None


def marks(block: Block) -> list[pytest.MarkDecorator]:
    """``model`` for the embedded model, ``http`` for a loopback server, and the block's :func:`worker_group`."""
    wanted = ((pytest.mark.model, block.model), (pytest.mark.http, block.backend or block.background))
    group = worker_group(block)
    return [mark for mark, applies in wanted if applies] + ([pytest.mark.xdist_group(group)] if group else [])


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=marks(b)) for b in BLOCKS])
def test_example_runs(
    block: Block, tmp_path: Path, environment: Environment, fast_backend_url: str, servers: Servers
) -> None:
    if block.skip:
        pytest.skip(f"{block.id}: {block.skip}")
    if block.background:
        server = servers.start(block)
        assert server.process.poll() is None
        return
    server = servers.for_block(block)
    block = on_free_ports(block)
    directory = workspace(tmp_path / "work")
    env = environment(block, directory)
    if block.language == "shell":
        code = render_shell(block, block.code, fast_backend_url, server)
        (directory / "example.sh").write_text(code, encoding="utf-8")
        command = ["bash", "-euo", "pipefail", "example.sh"]
    else:
        code = substitute(block, block.code, fast_backend_url, server)
        if block.setup:
            setup = substitute(block, "\n".join(block.setup), fast_backend_url, server)
            (directory / "setup.sh").write_text(setup + "\n", encoding="utf-8")
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "setup.sh"], cwd=directory, env=env,
                capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S,
            )  # fmt: skip
            assert done.returncode == 0, f"setup of {block.id} failed:\n{done.stderr[-3000:]}"
        (directory / "example.py").write_text(code, encoding="utf-8")
        command = [sys.executable, "example.py"]
    # Output goes to files, not pipes: a background job the block leaves running would
    # hold a pipe open, and waiting for its end would wait for that job.
    out_path, err_path = directory / "stdout.txt", directory / "stderr.txt"
    group = ProcessGroup()
    with out_path.open("w") as out, err_path.open("w") as err:
        process = group.start(command, cwd=directory, env=env, stdout=out, stderr=err, text=True)
    try:
        process.wait(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        group.stop(process)
        pytest.fail(f"{block.id} ran longer than {BLOCK_TIMEOUT_S} s\n{outputs(directory)}")
    finally:
        group.stop(process)  # background jobs the block started and did not end
    expired = " (a `timeout` in the example expired)" if process.returncode == 124 else ""
    assert process.returncode == 0, (
        f"{block.id} exited with {process.returncode}{expired}\n--- code\n{code}\n{outputs(directory)}"
    )


def test_bench_prints_without_write_and_leaves_the_committed_file(tmp_path: Path) -> None:
    """The cheapest benchmark that writes markdown, run as docs/configure.md shows it (one fault kind, without
    --write); with --write, a partial run is refused."""
    committed = ROOT / "bench" / "RELIABILITY.md"
    before = (committed.read_bytes(), committed.stat().st_mtime_ns)

    def reliability(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(ROOT / "bench" / "reliability.py"), "--quick", "--kinds", "503", *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )  # fmt: skip

    done = reliability()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 503 + SIGKILL |" in done.stdout  # the results table, printed, with the kind's scenarios only
    assert "| hang |" not in done.stdout
    assert "--write" in done.stdout  # says how to update the file
    refused = reliability("--write")
    assert refused.returncode == 2 and "drop --kinds" in refused.stderr
    assert (committed.read_bytes(), committed.stat().st_mtime_ns) == before
