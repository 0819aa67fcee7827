"""Run a pacore server on a free loopback port for tests.

:func:`running_app` serves an app object in a background thread (any
backend, fakes included); :func:`running_cli` starts the real ``pacore
serve`` command in a subprocess and reads its URL from its first line.
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

from pacore.backends.base import Backend
from pacore.server import ServerConfig, create_app

STARTUP_TIMEOUT_S = 60.0
#: The installed ``pacore`` command of this venv.
PACORE = shutil.which("pacore", path=str(Path(sys.executable).parent)) or "pacore"


@dataclass
class RunningServer:
    base_url: str  # http://127.0.0.1:PORT
    app: FastAPI | None = None

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"


@contextlib.contextmanager
def running_app(backend: Backend, config: ServerConfig | None = None) -> Iterator[RunningServer]:
    """Serve ``create_app(config, backend)`` with uvicorn on 127.0.0.1:<free port>."""
    app = create_app(config or ServerConfig(), backend)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        listener.close()


@contextlib.contextmanager
def running_cli(*args: str) -> Iterator[tuple[RunningServer, subprocess.Popen[str]]]:
    """Run ``pacore serve --port 0 ARGS`` until the block ends (then Ctrl+C it)."""
    command = [PACORE, "serve", "--port", "0", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line = process.stdout.readline() if process.stdout else ""
        match = re.search(r"listening on (http://\S+)", first_line)
        if not match:
            process.kill()
            _, err = process.communicate(timeout=10)
            raise RuntimeError(f"pacore serve did not start: {first_line!r} {err!r}")
        yield RunningServer(match.group(1)), process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
