"""Start llama-cpp-python's OpenAI-compatible server on loopback for tests.

It serves the embedded GGUF on a free port of 127.0.0.1 and is stopped on
exit. Run ``python tests/llama_server.py`` to get one by hand: it prints the
base URL and serves until interrupted.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from cli_harness import free_port
from harness import stop_process

STARTUP_TIMEOUT_S = 180.0


@contextlib.contextmanager
def llama_server(model_path: Path, *, n_ctx: int = 4096) -> Iterator[str]:
    """Run the server while the block runs; yields its base URL (``.../v1``)."""
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model_path),
        "--chat_format", "gemma",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        # One thread, as the embedded backend uses: make test runs parallel workers, so the cores are
        # busy anyway, and llama.cpp's threads wait for one another at every step (on a loaded
        # machine tests/test_http_integration.py took 24 s with one thread, 29 s with two).
        "--n_threads", "1",
        "--n_threads_batch", "1",
        # By default a new request cuts short a stream in progress.
        "--interrupt_requests", "False",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            base_url = f"http://127.0.0.1:{port}/v1"
            _wait_until_ready(process, base_url, log)
            yield base_url
        finally:
            stop_process(process, timeout=15)


def _wait_until_ready(process: subprocess.Popen, base_url: str, log) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"llama server exited with code {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"llama server at {base_url} not ready after {STARTUP_TIMEOUT_S:g}s")


if __name__ == "__main__":
    from pacore.backends.llama_cpp import default_model_path

    # Stop the server on SIGTERM too (background jobs ignore Ctrl-C).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with llama_server(default_model_path()) as url:
        print(url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
