"""Backend API keys never reach the run database, traces, reports, exports or the terminal.

``pacore run`` talks to ``bench/fastbackend.py --api-key``, which refuses any
other key (so the answers prove the key was sent) and quotes a wrong key back
in its 401, as some hosted APIs do. Injected faults make failures, with their
messages, land in the traces too. Then every byte the runs left behind is
searched for the keys.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from cli_harness import PACORE
from harness import fast_backend
from reliability import environment, kill_when, run_command, write_data

pytestmark = pytest.mark.http

SECRET = "sk-live-0123456789-SECRETKEY"
WRONG = "sk-wrong-9876543210-OTHERKEY"


def pacore(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, env=env or environment())


def answered(run_dir: Path) -> int:
    with sqlite3.connect(run_dir / "run.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM results WHERE status = 'done'").fetchone()[0]


def files_containing(root: Path, needle: str) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file() and needle.encode() in path.read_bytes()]


@pytest.mark.slow
def test_api_keys_stay_out_of_runs_traces_reports_and_output(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data.jsonl", 30)
    runs = tmp_path / "runs"
    keyed_env = {**environment(), "PACORE_API_KEY": SECRET}
    outputs: list[subprocess.CompletedProcess[str]] = []
    server_args = ("--api-key", SECRET, "--faults", "all:0.3", "--fault-seed", 4, "--completion-tokens", 6)
    with fast_backend(*server_args) as server:
        # The key as a flag, then from the environment; --retries 0 so that faults become recorded failures.
        flag_run = run_command(data, runs / "flag", [server.url], 0, "--api-key", SECRET)
        env_run = run_command(data, runs / "env", [server.url], 0)
        # Killed part way, a run leaves its write-ahead log behind: it is searched too.
        kill_when(env_run, tmp_path / "killed.log", runs / "env", 5, 0.0, env=keyed_env)
        assert (runs / "env" / "run.sqlite-wal").stat().st_size > 0
        wal_leaks = files_containing(runs, SECRET)
        assert files_containing(runs, "What is 3 + 1?")  # the search does see what the store holds
        by_env = pacore(*env_run, env=keyed_env)
        by_flag = pacore(*flag_run)
        wrong = pacore(*run_command(data, runs / "wrong", [server.url], 0, "--api-key", WRONG))
        outputs += [by_flag, by_env, wrong]
    outputs.append(pacore(PACORE, "report", str(runs / "flag")))
    outputs.append(pacore(PACORE, "export-train", str(runs / "env"), "--out", str(runs / "env" / "train.jsonl"),
                          "--min-acc", "-1", "--min-size", "1"))  # fmt: skip

    # The key was really used: only requests bearing it were answered.
    assert by_flag.returncode in (0, 1) and by_env.returncode in (0, 1), by_flag.stderr + by_env.stderr
    assert answered(runs / "flag") >= 3 and answered(runs / "env") >= 3
    assert (runs / "flag" / "report.html").is_file() and (runs / "env" / "train.jsonl").stat().st_size
    # ... and failures were recorded with their messages, faults and the refused key's 401 alike.
    with sqlite3.connect(runs / "wrong" / "run.sqlite") as db:
        errors = [row[0] for row in db.execute("SELECT error FROM results")]
    assert wrong.returncode == 1 and errors and all("rejected the API key (HTTP 401)" in e for e in errors)
    assert "Incorrect API key provided: ***" in errors[0]  # the server quoted it; pacore redacted it
    with sqlite3.connect(runs / "flag" / "run.sqlite") as db:
        traces = [json.loads(t) for (t,) in db.execute("SELECT trace_json FROM results") if t]
    assert any(t["error"] for t in traces) or any(
        traj["failed_attempts"] for t in traces for rnd in t["rounds"] for traj in rnd["trajectories"]
    )

    assert wal_leaks == [] and SECRET not in (tmp_path / "killed.log").read_text()
    for key in (SECRET, WRONG):
        assert files_containing(runs, key) == []  # run.sqlite, -wal, -shm, reports, plots, exports
        for process in outputs:
            assert key not in process.stdout and key not in process.stderr
    assert os.environ.get("PACORE_API_KEY") != SECRET  # the test did not leak it into its own process
