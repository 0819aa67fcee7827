"""Run a pacore server on a free loopback port for tests.

:func:`running_app` serves an app object in a background thread (any
backend, fakes included); :func:`serving` does the same for any uvicorn
server (a hostile upstream, say); :func:`running_cli` starts the real
``pacore serve`` command in a subprocess and reads its URL from its first line.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from harness import stop_process
from pacore.backends.base import Backend
from pacore.server import ServerConfig, create_app
from pacore.server.shutdown import GracefulServer

STARTUP_TIMEOUT_S = 60.0
#: The installed ``pacore`` command of this venv.
PACORE = shutil.which("pacore", path=str(Path(sys.executable).parent)) or "pacore"


@dataclass
class RunningServer:
    base_url: str  # http://127.0.0.1:PORT
    app: FastAPI | None = None
    #: ``server.should_exit = True`` shuts it down as SIGTERM would.
    server: uvicorn.Server | None = None
    #: What ``pacore serve`` printed first (running_cli only).
    start_line: str = ""

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"


@contextlib.contextmanager
def running_app(
    backend: Backend, config: ServerConfig | None = None, *, grace_period: float = 5.0
) -> Iterator[RunningServer]:
    """Serve ``create_app(config, backend)`` as ``pacore serve`` does, on 127.0.0.1:<free port>."""
    app = create_app(config or ServerConfig(), backend)
    server = GracefulServer(app, grace_period=grace_period, log_level="warning", access_log=False)
    with serving(server) as base_url:
        yield RunningServer(base_url, app, server)


@contextlib.contextmanager
def serving(server: uvicorn.Server) -> Iterator[str]:
    """Run ``server`` in a thread on 127.0.0.1:<free port>; yields its base URL."""
    # IPPROTO_TCP so that asyncio turns Nagle off (else each response waits 40 ms for an ACK).
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        listener.close()


@contextlib.contextmanager
def running_cli(*args: str) -> Iterator[tuple[RunningServer, subprocess.Popen[str]]]:
    """Run ``pacore serve --port 0 ARGS`` until the block ends (then Ctrl+C it)."""
    command = [PACORE, "serve", "--port", "0", *args]
    # As a context manager Popen closes its pipes at the end (else ResourceWarnings) once the process is reaped.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            first_line = process.stdout.readline() if process.stdout else ""
            match = re.search(r"listening on (http://\S+)", first_line)
            if not match:
                process.kill()
                _, err = process.communicate(timeout=10)
                raise RuntimeError(f"pacore serve did not start: {first_line!r} {err!r}")
            yield RunningServer(match.group(1), start_line=first_line.rstrip("\n")), process
        finally:
            if process.poll() is None:
                stop_process(process, signal.SIGINT, timeout=20)
