"""``pacore view RUN_DIR``: the trace viewer over a batch run's stored traces, read-only."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from pacore._extras import SERVER_MODULES, require
from pacore.cli.app import app
from pacore.cli.serve import _is_loopback, _listen, _url_host


@app.command("view")
def view(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory made by 'pacore run'.")],
    host: Annotated[str, typer.Option("--host", help="Interface to listen on (127.0.0.1: this machine only).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on (0: any free port).")] = 8001,
) -> None:
    """Open the trace viewer over RUN_DIR's results: every problem's status, answer, grade and trace.

    Read-only: the run is never changed, and a run still in progress shows the
    results committed so far (reload the page for more).

    Example: pacore view runs/gsm8k, then open http://127.0.0.1:8001/ui
    """
    require("server", *SERVER_MODULES, feature="pacore view")
    import uvicorn

    from pacore.server.runview import create_run_app

    viewer_app = create_run_app(run_dir)  # refuses a directory that holds no run, before listening
    listener = _listen(host, port)
    bound_host, bound_port = listener.getsockname()[:2]
    base = f"http://{_url_host(bound_host)}:{bound_port}"
    typer.echo(f"pacore view: {run_dir} (read-only) at {base}/ui · Ctrl-C to stop")
    if not _is_loopback(bound_host):
        typer.echo(f"pacore view: warning: {host} is reachable from other machines; the viewer has no key", err=True)
    server = uvicorn.Server(uvicorn.Config(viewer_app, log_level="warning", access_log=False))
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[listener])
    typer.echo("pacore view: stopped")
