"""Run the ``pacore`` command as a user would, and check what it says.

:func:`pacore` runs the installed entry point in a subprocess with
:func:`environment`: the developer's shell without the variables that would
change an outcome, and this checkout's ``src`` first on ``PYTHONPATH`` so the
subprocess runs the code under test even when the venv's editable install
points at another checkout. :func:`invoke` and :func:`pacore_in_process` run
the same command line in this process (through :func:`pacore.cli.main.main`,
which prints the errors), a tenth of a subprocess's CPU: for the checks of what
the command says, while a subprocess stays for what is about the process (the
entry point, argv bytes, signals, streams).
:func:`assert_one_line_error` is the check every front door's misuse gets: one
``pacore: error:`` line, no traceback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from pacore.cli.main import main

SRC = Path(__file__).resolve().parents[1] / "src"
#: The installed ``pacore`` command of this venv.
PACORE = shutil.which("pacore", path=str(Path(sys.executable).parent)) or "pacore"
#: Variables of the developer's shell that would change an outcome: API keys and the debug switch.
OUTCOME_VARIABLES = ("PACORE_API_KEY", "OPENAI_API_KEY", "PACORE_DEBUG")
#: The overrides of :func:`invoke`'s environment: those variables and the server's keys, unset.
CLEAN_ENV: dict[str, str | None] = dict.fromkeys((*OUTCOME_VARIABLES, "PACORE_SERVER_API_KEYS"))


def environment(*unset: str, **extra: str) -> dict[str, str]:
    """This process's environment without :data:`OUTCOME_VARIABLES` (nor ``unset``), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in OUTCOME_VARIABLES and k not in unset}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return {**env, **extra}


def pacore(
    *args: str,
    stdin: str = "",
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``pacore ARGS`` to its end, with ``stdin`` as its input; its exit code and output."""
    return subprocess.run(
        [PACORE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment() if env is None else env,
        cwd=cwd,
    )


def invoke(
    *args: str, stdin: bytes = b"", env: dict[str, str | None] | None = None, cwd: Path | None = None
) -> tuple[int, str, str]:
    """Run ``pacore ARGS`` in this process, with ``env`` set (None: unset) for it, in ``cwd`` if given:
    (exit code, stdout, stderr).

    An escaping exception fails the test."""
    isolation = CliRunner().isolation(input=stdin, env={**CLEAN_ENV, **(env or {})})
    with contextlib.chdir(cwd or Path.cwd()), isolation as (out, err, _):
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        return code, out.getvalue().decode("utf-8", "replace"), err.getvalue().decode("utf-8", "replace")


def pacore_in_process(
    *args: str, stdin: str = "", env: dict[str, str | None] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """:func:`pacore`'s outcome, from :func:`invoke`: for the tests of what a command says, not of its process."""
    code, stdout, stderr = invoke(*args, stdin=stdin.encode(), env=env, cwd=cwd)
    return subprocess.CompletedProcess(["pacore", *args], code, stdout, stderr)


def error_line(stderr: str) -> str:
    """The one ``pacore: error: ...`` line a failed command must print, and nothing else."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pacore: error: "), lines[0]
    assert "internal error" not in lines[0], lines[0]
    return lines[0]


def assert_one_line_error(process: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    """``process`` exited with ``code`` after one error line that says ``fragment``."""
    line = error_line(process.stderr)
    assert fragment in line, line
    assert process.returncode == code, (process.returncode, process.stderr)


def free_port() -> int:
    """A loopback port nothing listens on (free when asked; a test binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port_url() -> str:
    """An OpenAI-style base URL where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}/v1"
