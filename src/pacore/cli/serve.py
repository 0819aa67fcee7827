"""``pacore serve``: the OpenAI-compatible PaCoRe server with its trace viewer."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
from typing import Annotated

import typer

from pacore._extras import SERVER_MODULES, require
from pacore.adaptive import ComputePolicy
from pacore.cli.app import app
from pacore.cli.options import (
    BackendOption,
    DeadlineOption,
    MaxTokensOption,
    ModelOption,
    ReferenceOrderOption,
    RetriesOption,
    ScheduleOption,
    TemperatureOption,
    TemplateOption,
    ThreadsOption,
    TimeoutOption,
    TopPOption,
    backend_option,
    check_limits,
    generation_params,
    load_template,
    open_backends,
    panel_option,
    parse_reference_order,
    with_compute_options,
    with_settings_options,
)
from pacore.errors import PacoreError
from pacore.schedule import Schedule
from pacore.server.settings import ServerSettings

_EVERY_INTERFACE = ("0.0.0.0", "::")
API_KEYS_ENV = "PACORE_SERVER_API_KEYS"

EXAMPLES = """\
[bold]Examples[/bold]

  pacore serve
  pacore serve -b http://127.0.0.1:8080/v1 -m qwen3-8b -s high
  PACORE_SERVER_API_KEYS=k1,k2 pacore serve --host 0.0.0.0

Point any OpenAI client at http://127.0.0.1:8000/v1. Per request, pick a
schedule with the model name (pacore-high/MODEL, pacore-16/MODEL,
pacore-1/MODEL = pass-through) or extra_body={"pacore": {"schedule": [32, 4]}}.
Watch requests at /ui; scrape /metrics.
SIGTERM or Ctrl+C: no new requests; running ones get --grace-period to finish.
"""


SERVER_PANEL = "Server"
_server_option = panel_option(SERVER_PANEL)


@app.command("serve", epilog=EXAMPLES)
@with_compute_options
@with_settings_options("settings", ServerSettings, SERVER_PANEL)
def serve(
    host: Annotated[
        str, _server_option("--host", help="Interface to listen on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, _server_option("--port", "-p", help="Port to listen on (0: any free port).")] = 8000,
    api_key: Annotated[
        list[str] | None,
        _server_option(
            "--api-key",
            metavar="KEY",
            help=f"Accept requests bearing this key (repeatable). Default: the comma-separated keys "
            f"in ${API_KEYS_ENV}; none means no authentication.",
        ),
    ] = None,
    schedule: ScheduleOption = "medium",
    deadline: DeadlineOption = None,
    template: TemplateOption = None,
    reference_order: ReferenceOrderOption = "shuffle",
    max_tokens: MaxTokensOption = None,
    temperature: TemperatureOption = 1.0,
    top_p: TopPOption = 1.0,
    backend: BackendOption = None,
    model: ModelOption = None,
    backend_api_key: Annotated[
        str | None,
        backend_option(
            "--backend-api-key",
            envvar="PACORE_API_KEY",
            show_envvar=True,
            help="API key pacore sends to the backend server.",
        ),
    ] = None,
    timeout: TimeoutOption = None,
    retries: RetriesOption = None,
    threads: ThreadsOption = None,
    *,
    settings: ServerSettings,  # the other Server flags: one per ServerSettings field
    compute: ComputePolicy | None = None,
) -> None:
    """Serve PaCoRe behind an OpenAI-compatible /v1/chat/completions, with a live trace viewer at /ui.

    Request sampling fields (temperature, top_p, max_tokens, seed, stop) override the defaults set here,
    and a request's pacore.compute object overrides the adaptive-compute flags.
    """
    require("server", *SERVER_MODULES, feature="pacore serve")
    from pacore.engine import check_policy
    from pacore.server import ServerConfig, create_app
    from pacore.server.shutdown import GracefulServer

    keys = api_key if api_key else [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    plan = Schedule.parse(schedule)
    check_limits(deadline=deadline, min_success=None)
    config = ServerConfig(
        **dataclasses.asdict(settings),
        schedule=plan,
        params=generation_params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=None),
        template=load_template(template, plan),
        reference_order=parse_reference_order(reference_order),
        compute=compute,
        api_keys=tuple(keys),
        deadline_s=deadline,
    )
    if compute is not None:  # the policy of requests that name none must be able to run
        check_policy(compute, plan, config.params)
    listener = _listen(host, port)
    bound_host, bound_port = listener.getsockname()[:2]
    base = f"http://{_url_host(bound_host)}:{bound_port}"
    if settings.public_url is None and bound_host not in _EVERY_INTERFACE:
        # Known from the address listened on, never from a client's Host header.
        config = dataclasses.replace(config, public_url=base)
    opened = open_backends(
        backend, model=model, api_key=backend_api_key, timeout=timeout, retries=retries, threads=threads
    )
    app = create_app(config, opened)
    auth = f"{len(keys)} API key{'s' if len(keys) != 1 else ''}" if keys else "no API key"
    loopback = _is_loopback(bound_host)
    reach = "loopback only: this machine alone can connect" if loopback else "reachable from other machines"
    typer.echo(
        f"pacore serve: listening on {base} ({reach}) · OpenAI base_url {base}/v1 · viewer {base}/ui "
        f"· metrics {base}/metrics · model {opened.model or 'from the backend'} · schedule {plan.name()} · {auth}"
    )
    if not keys and not loopback:
        typer.echo(f"pacore serve: warning: {host} is reachable from other machines and no API key is set", err=True)
    _print_access_log()
    server = GracefulServer(
        app,
        grace_period=settings.grace_period_s,
        report=lambda line: typer.echo(f"pacore serve: {line}", err=True),
        log_level="warning",
        access_log=False,
    )
    # uvicorn handles SIGTERM itself, then raises it again once stopped; this handler
    # makes that second delivery a normal exit (0), and a SIGTERM before uvicorn
    # installs its own handler a normal shutdown.
    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        # uvicorn re-raises Ctrl+C after its graceful shutdown; for a server that is a normal stop.
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    typer.echo("pacore serve: stopped")


def _print_access_log() -> None:
    """One ``pacore serve: ...`` line on stderr per chat completion request."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pacore serve: %(message)s"))
    access = logging.getLogger("pacore.server.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False


def _listen(host: str, port: int) -> socket.socket:
    """Bind now, so a busy port is a one-line error and port 0 shows the real port."""
    if not 0 <= port <= 65535:
        raise typer.BadParameter(f"{port} is not a port (0-65535)", param_hint="'--port'")
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
        # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets, and
        # without it Nagle plus delayed ACKs hold every response's body for 40 ms.
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        # Listening now queues early clients until uvicorn serves the socket.
        listener.listen(2048)
    except OSError as exc:
        raise PacoreError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listener


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1"
