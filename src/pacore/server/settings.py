"""The server's settings that ``pacore serve`` takes as flags, and its per-request caps.

Plain data that needs none of the server's packages (FastAPI, uvicorn), so the
CLI builds ``pacore serve``'s options from these fields (each carries its
:class:`~pacore.flags.Flag`) without importing them;
:class:`pacore.server.ServerConfig` adds the engine's objects and the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pacore.flags import Flag, declared_flags

#: Large enough for a few images as data URLs; a 10 MB prompt is refused (413).
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
#: Enough for hundreds of ordinary requests, or a few of 64 long trajectories.
DEFAULT_HISTORY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request caps of a server, each checked before the work it bounds.

    ``pacore serve`` sets ``max_rounds`` and ``max_trajectories`` (``--max-rounds``, ``--max-trajectories``);
    the others are fields of :class:`pacore.server.ServerConfig` only (see docs/server-limits.md).
    """

    max_rounds: int = 4
    max_trajectories: int = 128
    max_messages: int = 1000
    #: Content parts (text, images) of one message.
    max_content_parts: int = 256
    #: Characters of the model name (a ``pacore-<schedule>/<model>`` name included).
    max_model_chars: int = 256
    #: JSON values (strings, numbers, objects...) in the whole body, about: the parser's work.
    max_json_values: int = 50_000


#: The caps' defaults, which the server's settings and config take theirs from.
DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class ServerSettings:
    """How a server answers and stops, as ``pacore serve``'s flags set it (in ``--help`` order)."""

    max_concurrent_requests: Annotated[
        int, Flag("--max-concurrent-requests", "Requests answered at once; more get 429.", metavar="N", min=1)
    ] = 4
    max_trajectories: Annotated[
        int,
        Flag("--max-trajectories", "Most calls one request may make (all rounds, final included).", metavar="N", min=1),
    ] = DEFAULT_LIMITS.max_trajectories
    max_rounds: Annotated[
        int, Flag("--max-rounds", "Most coordinated rounds one request may ask for.", metavar="N", min=1)
    ] = DEFAULT_LIMITS.max_rounds
    max_body_bytes: Annotated[
        int,
        Flag(
            "--max-body-bytes",
            "Largest request body accepted (413 beyond).",
            metavar="BYTES",
            min=1,
            default_text="8 MiB",
        ),
    ] = DEFAULT_MAX_BODY_BYTES
    #: Used by ``pacore serve``'s graceful shutdown (:class:`pacore.server.shutdown.GracefulServer`).
    grace_period_s: Annotated[
        float,
        Flag(
            "--grace-period",
            "On SIGTERM or Ctrl+C, how long running requests may take to finish before they are ended with a 503.",
            metavar="SECONDS",
            min=0,
        ),
    ] = 30.0
    history: Annotated[
        int, Flag("--history", "Recent requests kept in memory for the /ui viewer.", metavar="N", min=0)
    ] = 100
    history_bytes: Annotated[
        int,
        Flag(
            "--history-bytes",
            "Most the kept requests may hold; the oldest are forgotten first.",
            metavar="BYTES",
            min=0,
            default_text="64 MiB",
        ),
    ] = DEFAULT_HISTORY_BYTES
    header_timeout_s: Annotated[
        float,
        Flag(
            "--header-timeout",
            "Time a client has to send a request's headers (then 408, connection closed).",
            metavar="SECONDS",
            min=0.001,
        ),
    ] = 10.0
    body_timeout_s: Annotated[
        float,
        Flag(
            "--body-timeout",
            "Time a client has to send a request's body once its headers are in (then 408).",
            metavar="SECONDS",
            min=0.001,
        ),
    ] = 60.0
    write_timeout_s: Annotated[
        float,
        Flag(
            "--write-timeout",
            "Time a client may read nothing of a response before it is dropped and its slot freed.",
            metavar="SECONDS",
            min=0.001,
        ),
    ] = 30.0
    #: Where clients reach this server (``http://host:port``): makes each ``trace_url`` absolute.
    public_url: Annotated[
        str | None,
        Flag(
            "--public-url",
            "Where clients reach this server (behind a proxy, say): each answer's trace_url starts with it. "
            "Default: the address listened on, unless that is every interface (0.0.0.0, ::).",
            metavar="URL",
        ),
    ] = None
    log_content: Annotated[
        bool, Flag("--log-content", "Access log lines also quote each question and answer (shortened).")
    ] = False
    #: ``None``: memory only.
    history_db: Annotated[
        Path | None,
        Flag(
            "--history-db",
            "Also keep those requests in this SQLite file, so /ui still shows them after a restart.",
            metavar="FILE",
        ),
    ] = None

    def __post_init__(self) -> None:
        # Each flag's bound, also for settings built in Python (pacore.server.ServerConfig).
        for name, _, flag in declared_flags(ServerSettings):
            flag.check(name, getattr(self, name))
