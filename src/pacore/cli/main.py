"""Entry point of the ``pacore`` command: assembles the command groups on
:data:`pacore.cli.app.app` and runs it.

Errors become one line on stderr here, and only here: usage mistakes and
unusable inputs exit with 2, runtime failures with 1, an interrupt with 130
(see :data:`EXIT_CODES`). No traceback reaches the user (set
``PACORE_DEBUG=1`` to see one).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys

import typer

# typer 0.29 vendors its own click; its exceptions are these, not ``click``'s.
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer._click.exceptions import UsageError as ClickUsageError

from pacore.cli.app import EXIT_CODES, app
from pacore.errors import PacoreError, UsageError, first_error

__all__ = ["EXIT_CODES", "app", "exit_code_for", "main"]


#: The command modules, in the order ``pacore --help`` lists their commands.
COMMAND_MODULES = ("ask", "run", "report", "serve", "train", "view", "data", "model")
#: The commands registered by a module of another name.
COMMAND_HOMES = {"export-train": "report", "regrade": "run"}


def _register_commands(command: str | None = None) -> None:
    # Each command group lives in its own module and registers itself on ``app`` when imported.
    # A known command needs only its own module: ``pacore ask`` then starts without importing the
    # evaluation code of run and report (a tenth of a second); ``--version`` needs none; help and
    # typos get every command.
    if command == "--version":
        return
    home = COMMAND_HOMES.get(command or "", command)
    for name in [home] if home in COMMAND_MODULES else COMMAND_MODULES:
        importlib.import_module(f"pacore.cli.{name}")
    for typer_app in [app, *(group.typer_instance for group in app.registered_groups if group.typer_instance)]:
        for info in typer_app.registered_commands:
            if info.help is None and info.callback is not None and info.callback.__doc__:
                info.help = unwrapped(info.callback.__doc__)


def unwrapped(doc: str) -> str:
    """``doc`` with the lines of each paragraph joined, but for indented paragraphs (examples) and list items.

    typer's ``--help`` keeps the line breaks of a docstring's later paragraphs,
    which then break sentences in the middle once the terminal wraps them too.
    """
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(
        p if p.startswith((" ", "\b")) or "\n " in p else _LINE_IN_PARAGRAPH.sub(" ", p) for p in paragraphs
    )


#: A line break inside a paragraph, other than before a list item.
_LINE_IN_PARAGRAPH = re.compile(r"\n(?![-*] )")


def exit_code_for(exc: BaseException) -> int:
    """The one mapping from errors to exit codes."""
    if isinstance(exc, (UsageError, ClickUsageError)):
        return 2
    if isinstance(exc, KeyboardInterrupt | typer.Abort):
        return 130
    return 1


def fail(message: str, code: int) -> None:
    """Print ``pacore: error: message`` on one line and exit."""
    one_line = " ".join(str(message).split())
    print(f"pacore: error: {one_line}", file=sys.stderr)
    raise SystemExit(code)


def check_text(args: list[str]) -> None:
    """Refuse arguments and PACORE_* variables that are not UTF-8 (Python hands them over as lone surrogates)."""
    named = [(f"argument {index}", arg) for index, arg in enumerate(args, start=1)]
    named += [(f"${name}", value) for name, value in os.environ.items() if name.startswith("PACORE_")]
    for where, text in named:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            shown = text.encode("utf-8", "surrogateescape")[:40]
            raise UsageError(f"{where} is not valid UTF-8 text: {shown!r}") from None


def run_command(args: list[str]) -> object:
    """Run the command line; a task group's failure is reported as its first error."""
    check_text(args)
    command = typer.main.get_command(app)
    try:
        return command.main(args=args, prog_name="pacore", standalone_mode=False)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    _register_commands(args[0] if args else None)
    try:
        code = run_command(args)
    except NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx else "")
        raise SystemExit(0) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except ClickUsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "pacore"
        fail(f"{exc.format_message()} (see '{where} --help')", exit_code_for(exc))
    except ClickException as exc:
        fail(exc.format_message(), 1)
    except (typer.Abort, KeyboardInterrupt) as exc:
        fail("interrupted", exit_code_for(exc))
    except PacoreError as exc:
        if os.environ.get("PACORE_DEBUG"):
            raise
        fail(str(exc), exit_code_for(exc))
    except OSError as exc:
        if os.environ.get("PACORE_DEBUG"):
            raise
        fail(str(exc), 1)
    except Exception as exc:  # a bug: still one line, and the way to see more
        if os.environ.get("PACORE_DEBUG"):
            raise
        fail(f"internal error: {type(exc).__name__}: {exc} (PACORE_DEBUG=1 shows the traceback)", 1)
    if code == 130:  # the vendored click turns Ctrl-C into a return code
        fail("interrupted", 130)
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
