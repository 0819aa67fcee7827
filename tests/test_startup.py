"""Starting pacore imports only what the command needs (bench/startup.py measures what that saves).

Each check runs the command in a fresh interpreter and lists the modules it
loaded: ``import pacore`` and ``pacore --version`` load neither pydantic nor
the engine; declaring the commands (``pacore --help``, ``pacore ask --help``)
and listing the data sets (``pacore data list``) load neither the engine, the
server, the evaluation code, jinja2, httpx nor asyncio, and build no validator
of pacore's own models.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_harness import environment

#: Loaded by the library when it runs a request, never to declare a command or print its help.
RUN_TIME_MODULES = (
    "asyncio",
    "httpx",
    "jinja2",
    "pacore.backends",
    "pacore.engine",
    "pacore.eval.report",
    "pacore.eval.runner",
    "pacore.prompts",
    "pacore.server.app",
    "pacore.store",
    "pacore.trace",
)

LOADED = """
import json, sys
{statement}
print(json.dumps(sorted(sys.modules)))
"""

COMMAND = """
from pacore.cli.main import main
try:
    main({args!r})
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
"""


def loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``statement``."""
    done = subprocess.run(
        [sys.executable, "-c", LOADED.format(statement=statement)],
        capture_output=True, text=True, env=environment(), timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_import_pacore_loads_neither_pydantic_nor_the_engine() -> None:
    unwanted = {*RUN_TIME_MODULES, "pydantic", "typer"}
    loaded = loaded_by("import pacore")
    assert not loaded & unwanted, sorted(loaded & unwanted)


def test_public_names_are_imported_on_first_use() -> None:
    loaded = loaded_by("import pacore; assert pacore.solve and pacore.Schedule and pacore.UsageError")
    assert {"pacore.api", "pacore.engine", "pacore.schedule"} <= loaded
    assert "httpx" not in loaded  # OpenAIBackend alone needs the HTTP client


def test_version_needs_no_command_module() -> None:
    unwanted = {*RUN_TIME_MODULES, "pydantic", "rich"}
    loaded = loaded_by(COMMAND.format(args=["--version"]))
    assert not loaded & unwanted, sorted(loaded & unwanted)
    assert {name for name in loaded if name.startswith("pacore.cli.")} == {"pacore.cli.app", "pacore.cli.main"}


@pytest.mark.parametrize(
    "args", [["--help"], ["ask", "--help"], ["run", "--help"], ["serve", "--help"], ["data", "list"]], ids=" ".join
)
def test_declaring_the_commands_and_listing_data_sets_load_no_run_time_module(args: list[str]) -> None:
    statement = COMMAND.format(args=args) + (
        "from pacore.adaptive import ComputePolicy\n"
        "assert not ComputePolicy.__pydantic_complete__, 'ComputePolicy was validated'\n"
    )
    loaded = loaded_by(statement)
    assert "pacore.adaptive" in loaded  # the adaptive-compute flags are read from ComputePolicy's fields
    assert not loaded & set(RUN_TIME_MODULES), sorted(loaded & set(RUN_TIME_MODULES))
