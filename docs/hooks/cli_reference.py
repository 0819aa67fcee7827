"""mkdocs hook: the CLI reference page, generated from each command's ``--help``.

Generated at build time so it can never drift from the code.
"""

from __future__ import annotations

import os
import subprocess
import sys

from mkdocs.structure.files import File, Files

PAGE = "cli.md"


def _help(*command: str) -> str:
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb", "PACORE_DEBUG": ""}
    done = subprocess.run(
        [sys.executable, "-m", "pacore", *command, "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return done.stdout.rstrip()


def _commands() -> list[tuple[str, ...]]:
    import typer.main

    from pacore.cli.main import _register_commands, app

    _register_commands()
    group = typer.main.get_command(app)
    found: list[tuple[str, ...]] = []

    def walk(command, path: tuple[str, ...]) -> None:
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            if getattr(sub, "hidden", False):
                continue
            found.append((*path, name))
            walk(sub, (*path, name))

    walk(group, ())
    return found


def _page() -> str:
    parts = ["# CLI reference", "", "Generated from `pacore COMMAND --help` when the docs are built.", ""]
    parts += ["## pacore", "", "```text", _help(), "```", ""]
    for command in _commands():
        parts += [f"## pacore {' '.join(command)}", "", "```text", _help(*command), "```", ""]
    return "\n".join(parts)


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, PAGE, content=_page()))
    return files
