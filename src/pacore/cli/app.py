"""The ``pacore`` typer application that every command module registers on.

It lives apart from :mod:`pacore.cli.main` so a command module imports the app,
never the entry point that assembles and runs it.
"""

from __future__ import annotations

import typer

from pacore import __version__

#: Every exit status of ``pacore``; docs/cli-errors.md explains each.
EXIT_CODES = {
    0: "success",
    1: "runtime failure (backend unreachable or failing, problems failed, run directory in use, "
    "an output that cannot be written)",
    2: "bad usage or unusable input (arguments, files, data sets, templates, a damaged or newer "
    "run database, an output path that names an input)",
    130: "interrupted (Ctrl-C); what was computed is kept",
}

EPILOG = "[bold]Exit codes[/bold]: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + "."

app = typer.Typer(
    name="pacore",
    help="Parallel Coordinated Reasoning: scale a model's test-time compute across parallel, "
    "compacted, synthesized rounds.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pacore {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Parallel Coordinated Reasoning for any language model."""
