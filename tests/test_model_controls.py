"""Embedded model controls: ``--threads`` / ``PACORE_THREADS`` and ``pacore model info``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cli_harness import assert_one_line_error, pacore_in_process
from pacore.backends import LlamaCppBackend
from pacore.cli.options import open_backends
from pacore.errors import UsageError


def model_controls(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``pacore ARGS`` (in-process) with no thread or context setting but those in ``env``."""
    return pacore_in_process(*args, env={"PACORE_THREADS": None, "PACORE_N_CTX": None, **env})


def test_model_info_shows_context_max_tokens_and_threads() -> None:
    default = model_controls("model", "info", "--json")
    assert default.returncode == 0, default.stderr
    figures = json.loads(default.stdout)
    assert (figures["context_tokens"], figures["default_max_tokens"], figures["threads"]) == (16384, 512, 1)
    assert figures["threads_from"] == "default" and Path(figures["path"]).is_file()

    configured = json.loads(model_controls("model", "info", "--json", PACORE_THREADS="2", PACORE_N_CTX="4096").stdout)
    assert (configured["context_tokens"], configured["threads"]) == (4096, 2)
    flagged = model_controls("model", "info", "--threads", "2")
    assert flagged.returncode == 0, flagged.stderr
    assert "16,384 tokens" in flagged.stdout and "512 per call" in flagged.stdout
    assert "threads:            2 (--threads/PACORE_THREADS" in flagged.stdout


@pytest.mark.parametrize("command", [["model", "info"], ["ask", "hi"], ["run", "nothing.jsonl", "--out", "r"]])
def test_a_bad_thread_count_is_a_one_line_usage_error(command: list[str], tmp_path: Path) -> None:
    data = tmp_path / "nothing.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    command = [str(data) if part == "nothing.jsonl" else part for part in command]
    command = [str(tmp_path / "r") if part == "r" else part for part in command]
    assert_one_line_error(model_controls(*command, "--threads", "0"), 2, "--threads must be at least 1")


def test_a_bad_pacore_threads_is_a_one_line_usage_error() -> None:
    assert_one_line_error(model_controls("model", "info", PACORE_THREADS="many"), 2, "env var: 'PACORE_THREADS'")


def test_threads_reach_local_models_and_are_ignored_by_servers() -> None:
    local = open_backends(None, threads=2)
    assert isinstance(local, LlamaCppBackend) and local.threads == 2
    remote = open_backends(["http://127.0.0.1:9/v1"], model="m", threads=2)
    assert "http://127.0.0.1:9/v1" in remote.name  # opened, the option not passed to the HTTP client
    with pytest.raises(UsageError, match="--threads must be at least 1"):
        open_backends(None, threads=0)
