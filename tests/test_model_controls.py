"""Embedded model controls: ``--threads`` / ``PACORE_THREADS`` and ``pacore model info``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pacore.backends import LlamaCppBackend
from pacore.cli.options import open_backends
from pacore.errors import UsageError

PACORE = shutil.which("pacore", path=str(Path(sys.executable).parent)) or shutil.which("pacore")


def pacore(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    assert PACORE
    base = {k: v for k, v in os.environ.items() if k not in ("PACORE_THREADS", "PACORE_N_CTX", "PACORE_DEBUG")}
    return subprocess.run([PACORE, *args], capture_output=True, text=True, timeout=120, env={**base, **env})


def assert_usage_error(process: subprocess.CompletedProcess[str], fragment: str) -> None:
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert process.returncode == 2 and "Traceback" not in process.stderr, process.stderr
    assert len(lines) == 1 and lines[0].startswith("pacore: error: ") and fragment in lines[0], process.stderr


def test_model_info_shows_context_max_tokens_and_threads() -> None:
    default = pacore("model", "info", "--json")
    assert default.returncode == 0, default.stderr
    figures = json.loads(default.stdout)
    assert (figures["context_tokens"], figures["default_max_tokens"], figures["threads"]) == (16384, 512, 1)
    assert figures["threads_from"] == "default" and Path(figures["path"]).is_file()

    configured = json.loads(pacore("model", "info", "--json", PACORE_THREADS="2", PACORE_N_CTX="4096").stdout)
    assert (configured["context_tokens"], configured["threads"]) == (4096, 2)
    flagged = pacore("model", "info", "--threads", "2")
    assert flagged.returncode == 0, flagged.stderr
    assert "16,384 tokens" in flagged.stdout and "512 per call" in flagged.stdout
    assert "threads:            2 (--threads/PACORE_THREADS" in flagged.stdout


@pytest.mark.parametrize("command", [["model", "info"], ["ask", "hi"], ["run", "nothing.jsonl", "--out", "r"]])
def test_a_bad_thread_count_is_a_one_line_usage_error(command: list[str], tmp_path: Path) -> None:
    data = tmp_path / "nothing.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    command = [str(data) if part == "nothing.jsonl" else part for part in command]
    command = [str(tmp_path / "r") if part == "r" else part for part in command]
    assert_usage_error(pacore(*command, "--threads", "0"), "--threads must be at least 1")


def test_a_bad_pacore_threads_is_a_one_line_usage_error() -> None:
    assert_usage_error(pacore("model", "info", PACORE_THREADS="many"), "env var: 'PACORE_THREADS'")


def test_threads_reach_local_models_and_are_ignored_by_servers() -> None:
    local = open_backends(None, threads=2)
    assert isinstance(local, LlamaCppBackend) and local.threads == 2
    remote = open_backends(["http://127.0.0.1:9/v1"], model="m", threads=2)
    assert "http://127.0.0.1:9/v1" in remote.name  # opened, the option not passed to the HTTP client
    with pytest.raises(UsageError, match="--threads must be at least 1"):
        open_backends(None, threads=0)
