"""Prometheus metrics of one server, in a registry of their own.

A registry per app (not prometheus-client's global one) lets several apps
live in one process (tests) without their counts mixing.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from pacore.errors import BackendError
from pacore.trace import Event, RoundFinished, TrajectoryFinished

# PaCoRe requests run from seconds (pass-through) to hours (high schedules).
_REQUEST_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
_ROUND_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds...
        ProcessCollector(registry=r)
        self.requests = Counter(
            "pacore_requests", "HTTP requests by endpoint and final status (499: client went away).",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("pacore_requests_in_flight", "Chat completion requests being answered now.", registry=r)
        self.request_seconds = Histogram(
            "pacore_request_duration_seconds", "Time to answer a chat completion request, streaming included.",
            buckets=_REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.round_seconds = Histogram(
            "pacore_round_duration_seconds", "Time of one PaCoRe round.",
            ["final"], buckets=_ROUND_BUCKETS, registry=r,
        )  # fmt: skip
        self.trajectories = Counter(
            "pacore_trajectories", "Trajectories (backend calls' samples) finished, by outcome.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.generated_tokens = Counter(
            "pacore_generated_tokens", "Completion tokens generated over all rounds (effective TTC).", registry=r
        )
        self.prompt_tokens = Counter("pacore_prompt_tokens", "Prompt tokens read over all rounds.", registry=r)
        self.clients_cut = Counter(
            "pacore_clients_cut", "Connections or request slots the server ended itself: a client too slow "
            "to send its headers or body, or to read its response, headers too large, or a stream unwritten past "
            "its deadline.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.history_dropped = Counter(
            "pacore_history_dropped", "Requests the viewer's history forgot to stay within its count and bytes.",
            registry=r,
        )  # fmt: skip
        self.backend_errors = Counter(
            "pacore_backend_errors", "Backend failures by kind (connect, timeout, status, ...).",
            ["kind"], registry=r,
        )  # fmt: skip

    def observe(self, event: Event) -> None:
        """Count what an engine event says."""
        if isinstance(event, TrajectoryFinished):
            trajectory = event.trajectory
            self.trajectories.labels(outcome="ok" if trajectory.ok else "failed").inc()
            self.generated_tokens.inc(trajectory.completion_tokens)
            self.prompt_tokens.inc(trajectory.prompt_tokens)
            if trajectory.error_kind:
                self.backend_errors.labels(kind=trajectory.error_kind).inc()
        elif isinstance(event, RoundFinished):
            self.round_seconds.labels(final=str(event.round.final).lower()).observe(event.round.elapsed_s)

    def request_failed(self, exc: BaseException) -> None:
        # A fatal backend error stops the request before any trajectory records it.
        if isinstance(exc, BackendError):
            self.backend_errors.labels(kind=exc.kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
