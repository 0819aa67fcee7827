"""Graceful shutdown: running requests get a grace period, then a clean error.

On SIGTERM (or Ctrl+C) :class:`GracefulServer` stops accepting connections,
answers new chat completions on already open ones with a 503, and lets the
running ones finish for ``grace_period`` seconds. Those still running then
are ended by the app itself with an OpenAI-format 503 (an error event for a
stream), so every client gets a complete response rather than a cut
connection, and their backend calls are cancelled.

:class:`GracefulServer` also serves every connection with the read and
write timeouts of :mod:`pacore.server.transport`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI

from pacore.errors import UsageError
from pacore.server.errors import ShuttingDownError
from pacore.server.transport import H11_HEAD_LIMIT, guarded_protocol

logger = logging.getLogger("pacore.server")

#: Time left, after the grace period, to write the error replies before uvicorn cuts connections.
_WRITE_OUT_S = 5.0


class GracefulServer(uvicorn.Server):
    """uvicorn serving a pacore app, with the shutdown described above."""

    def __init__(
        self,
        app: FastAPI,
        *,
        grace_period: float,
        report: Callable[[str], None] = logger.warning,
        **options: Any,
    ) -> None:
        if grace_period < 0:
            raise UsageError(f"grace_period must be 0 or more, got {grace_period:g}")
        pacore = app.state.pacore
        config = pacore.config
        protocol = guarded_protocol(
            header_timeout=config.header_timeout_s,
            write_timeout=config.write_timeout_s,
            on_cut=lambda reason: pacore.metrics.clients_cut.labels(reason=reason).inc(),
        )
        # uvicorn's annotations are narrower than what it accepts: a protocol factory, fractional seconds.
        config = uvicorn.Config(
            app,
            http=protocol,  # type: ignore[arg-type]
            h11_max_incomplete_event_size=H11_HEAD_LIMIT,
            timeout_graceful_shutdown=grace_period + _WRITE_OUT_S,  # type: ignore[arg-type]
            **options,
        )
        super().__init__(config)
        self.pacore = pacore
        self.grace_period = grace_period
        self.report = report

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.pacore.drain()
        if running := self.pacore.running:
            self.report(
                f"stopping: no new connections; {running} running request{'s' if running != 1 else ''} "
                f"get up to {self.grace_period:g}s to finish"
            )
        timer = asyncio.get_running_loop().call_later(self.grace_period, self._end_running)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _end_running(self) -> None:
        reason = ShuttingDownError(
            f"the server shut down before this request finished (grace period {self.grace_period:g}s)"
        )
        if ended := self.pacore.abort_running(reason):
            self.report(f"ended {ended} request{'s' if ended != 1 else ''} still running after the grace period")
