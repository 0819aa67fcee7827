"""The OpenAI-compatible PaCoRe server: ``create_app(config, backend)``.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` and the trace viewer under ``/ui``. Every request runs
through :func:`pacore.asolve`; the server only translates, limits and
watches.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacore.backends.base import Backend, GenerationParams
from pacore.engine import asolve
from pacore.errors import PacoreError, UsageError
from pacore.prompts import SynthesisTemplate
from pacore.synthesis import ReferenceOrder
from pacore.schedule import PRESETS, Schedule
from pacore.server import metrics as metrics_module
from pacore.server.completions import (
    PASSTHROUGH_ALIAS,
    ChunkWriter,
    Limits,
    Plan,
    check_limits,
    completion_of,
    parse_body,
    plan_request,
)
from pacore.server.errors import (
    CLIENT_CLOSED_REQUEST,
    AuthenticationError,
    InternalError,
    OverloadedError,
    PayloadTooLargeError,
    ShuttingDownError,
    describe,
    install_error_handlers,
)
from pacore.server.history import HistoryDatabase, RequestDetail, RequestHistory, RequestRecord, RequestSummary
from pacore.server.metrics import ServerMetrics
from pacore.server.protocol import ChatCompletion, ChatCompletionRequest, ErrorResponse, ModelCard, ModelList
from pacore.trace import Event, Result

logger = logging.getLogger("pacore.server")

STATIC_DIR = files("pacore.server") / "static"
#: Large enough for a few images as data URLs; a 10 MB prompt is refused (413).
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
#: Routes anyone may open: the health probe and the viewer's static shell (it holds no data).
_PUBLIC_PATHS = ("/health", "/ui", "/ui/")
_PUBLIC_PREFIX = "/ui/static/"
# Key of the request state where a handler leaves the status it ended with
# when that differs from the one sent (a stream that failed or lost its client).
_OUTCOME_KEY = "pacore_status"


@dataclass(frozen=True)
class ServerConfig:
    """How a server answers; every field has a safe default."""

    #: Used when a request names no schedule.
    schedule: Schedule = field(default_factory=lambda: Schedule.parse("medium"))
    #: Defaults for sampling; a request's own fields override them.
    params: GenerationParams = field(default_factory=GenerationParams)
    template: SynthesisTemplate = field(default_factory=SynthesisTemplate.default)
    #: Used when a request names no ``pacore.reference_order``.
    reference_order: ReferenceOrder = "shuffle"
    #: Accepted bearer tokens; empty means no authentication.
    api_keys: tuple[str, ...] = ()
    max_concurrent_requests: int = 4
    #: Most calls one request may make, the final one included.
    max_trajectories: int = 128
    max_rounds: int = 4
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Requests kept for the trace viewer.
    history: int = 100
    #: A SQLite file that also keeps them, so they outlive the process (``None``: memory only).
    history_db: Path | None = None
    #: Seconds a client refused for load is told to wait.
    retry_after_s: int = 5
    #: Seconds one request may run before it fails with a 504 (``None``: no limit).
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_concurrent_requests", "max_trajectories", "max_rounds", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise UsageError(f"deadline_s must be positive, got {self.deadline_s:g}")
        if self.history < 0:
            raise UsageError(f"history must be 0 or more, got {self.history}")
        if any(not key.strip() for key in self.api_keys):
            raise UsageError("an API key must not be empty")
        # The default must pass the server's own caps, or every plain request would be refused.
        check_limits(self.schedule, None, self.limits)

    @property
    def limits(self) -> Limits:
        return Limits(max_rounds=self.max_rounds, max_trajectories=self.max_trajectories)


class _Server:
    """Everything the routes share: config, backend, history, metrics, load."""

    def __init__(self, config: ServerConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        database = None
        if config.history_db is not None and config.history:
            database = HistoryDatabase(config.history_db, config.history)
        self.history = RequestHistory(config.history, database)
        self.metrics = ServerMetrics()
        self.runs: set[_ChatRun] = set()
        #: Set when the server starts shutting down: new chat completions get a 503.
        self.draining = False

    @property
    def model(self) -> str:
        return self.backend.model or "default"

    @property
    def running(self) -> int:
        return len(self.runs)

    def admit(self, plan: Plan, request: Request) -> _ChatRun:
        if self.draining:
            raise ShuttingDownError("the server is shutting down and takes no new requests")
        if self.running >= self.config.max_concurrent_requests:
            raise OverloadedError(
                f"the server is answering {self.running} requests, its limit; retry in "
                f"{self.config.retry_after_s}s",
                retry_after=self.config.retry_after_s,
            )
        return _ChatRun(self, plan, request)

    def drain(self) -> None:
        """Refuse new chat completions from now on; the running ones go on."""
        self.draining = True

    def abort_running(self, reason: PacoreError) -> int:
        """End every running chat completion with ``reason``; how many there were."""
        runs = [run for run in self.runs if not run.task.done()]
        for run in runs:
            run.abort(reason)
        return len(runs)


class _ChatRun:
    """One admitted chat completion: its engine task, its trace record, its slot."""

    def __init__(self, server: _Server, plan: Plan, request: Request) -> None:
        self.server = server
        self.plan = plan
        self.request = request
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.trace_url = f"/ui#{self.id}"
        self.record = server.history.add(
            RequestRecord(self.id, plan.model, plan.schedule.as_list(), plan.messages, plan.stream)
        )
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.started = time.perf_counter()
        self.closed = False
        #: Why the server ended this run itself (shutdown), sent to the client.
        self.aborted: PacoreError | None = None
        server.runs.add(self)
        server.metrics.in_flight.inc()
        self.task = asyncio.create_task(self._solve())
        self.task.add_done_callback(lambda _: self.queue.put_nowait(None))

    async def _solve(self) -> Result:
        try:
            return await asolve(
                self.plan.messages,
                schedule=self.plan.schedule,
                backend=self.server.backend,
                params=self.plan.params,
                template=self.server.config.template,
                reference_order=self.plan.reference_order or self.server.config.reference_order,
                on_event=self._on_event,
                deadline=self.server.config.deadline_s,
                stream_answer=self.plan.stream,
            )
        except PacoreError as exc:
            self.server.metrics.request_failed(exc)
            raise
        except Exception as exc:
            # A bug, not a failure pacore knows: its traceback goes to the log, never to the client.
            logger.error("internal error answering %s", self.id, exc_info=exc)
            self.record.finish("failed", "internal error; see the server log")
            raise InternalError("internal server error; see the server log") from exc

    def _on_event(self, event: Event) -> None:
        self.record.apply(event)
        self.server.metrics.observe(event)
        if self.plan.stream:
            self.queue.put_nowait(event)

    async def result(self) -> Result | None:
        """The engine's result, or ``None`` when the client disconnected first."""
        watcher = asyncio.create_task(_disconnected(self.request.receive))
        try:
            await asyncio.wait({self.task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not self.task.done():
            return None
        if (error := self._error()) is not None:
            raise error
        return self.task.result()

    def _error(self) -> BaseException | None:
        """Why the finished engine task has no result (``None``: it has one)."""
        if self.task.cancelled():
            return self.aborted or ShuttingDownError("the request was cancelled")
        return self.task.exception()

    def abort(self, reason: PacoreError) -> None:
        """End the run with ``reason`` for its client; cancel the engine and its backend calls."""
        self.aborted = reason
        self.record.finish("cancelled", str(reason))
        self.task.cancel()

    async def chunks(self) -> AsyncIterator[str]:
        writer = ChunkWriter(request_id=self.id, model=self.plan.model, include_usage=self.plan.include_usage)
        yield writer.opening()
        while (event := await self.queue.get()) is not None:
            for chunk in writer.on_event(event):
                yield chunk
        if (exc := self._error()) is not None:
            reply = describe(exc)
            setattr(self.request.state, _OUTCOME_KEY, reply.status)
            yield reply.sse_event()
            return
        for chunk in writer.closing(self.task.result(), self.trace_url):
            yield chunk

    def close(self) -> None:
        """Release the slot; cancel the engine (all its backend calls) if still running."""
        if self.closed:
            return
        self.closed = True
        if not self.task.done():
            self.task.cancel()
            self.record.finish("cancelled", "the client disconnected")
            setattr(self.request.state, _OUTCOME_KEY, CLIENT_CLOSED_REQUEST)
        self.server.runs.discard(self)
        self.server.metrics.in_flight.dec()
        self.server.metrics.request_seconds.observe(time.perf_counter() - self.started)
        self.server.history.finished(self.record)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """Server-sent events that close their run however the response ends."""

    def __init__(self, run: _ChatRun) -> None:
        super().__init__(
            run.chunks(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette cancels the body when the client disconnects; the
            # engine task runs apart from it and must be cancelled here.
            self.run.close()


class _Guard:
    """ASGI middleware: API keys, the body size limit and per-request counting."""

    def __init__(self, app: ASGIApp, server: _Server) -> None:
        self.app = app
        self.server = server
        self.key_digests = [_digest(key.encode()) for key in server.config.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        sent = {"status": 500}

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await describe(refusal).response()(scope, receive, send_counted)
                return
            await self.app(scope, self._limited(receive), send_counted)
        finally:
            status = state.get(_OUTCOME_KEY, sent["status"])
            self.server.metrics.requests.labels(endpoint=_endpoint(scope["path"]), status=str(status)).inc()

    def _refusal(self, scope: Scope) -> PacoreError | None:
        headers = dict(scope["headers"])
        path = scope["path"]
        if self.key_digests and path not in _PUBLIC_PATHS and not path.startswith(_PUBLIC_PREFIX):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                return AuthenticationError("missing API key: send it as the header 'Authorization: Bearer KEY'")
            if not self._known(token.strip()):
                return AuthenticationError("invalid API key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.server.config.max_body_bytes:
            return self._too_large()
        return None

    def _known(self, token: bytes) -> bool:
        # Digests of equal length are compared, every one in constant time, so timing
        # tells neither which key matched nor how long the keys are.
        digest = _digest(token)
        matched = False
        for key_digest in self.key_digests:
            matched |= hmac.compare_digest(digest, key_digest)
        return matched

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"the request body exceeds this server's limit of {self.server.config.max_body_bytes:,} bytes"
        )

    def _limited(self, receive: Receive) -> Receive:
        """``receive`` that fails once a body without Content-Length grows past the limit."""
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.server.config.max_body_bytes:
                    raise self._too_large()
            return message

        return limited


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _endpoint(path: str) -> str:
    """A bounded label for a path (no ids, no arbitrary 404 paths)."""
    if path.startswith("/ui/api/requests/"):
        return "/ui/api/requests/{id}"
    if path.startswith(_PUBLIC_PREFIX):
        return "/ui/static"
    known = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/openapi.json", "/ui", "/ui/api/requests")
    return path if path in known else "other"


def model_ids(model: str) -> list[str]:
    """The served model and its PaCoRe variants, as ``/v1/models`` lists them."""
    presets = [name for name in PRESETS if name != "off"]
    return [model, *(f"pacore-{name}/{model}" for name in presets), f"pacore-{PASSTHROUGH_ALIAS}/{model}"]


def create_app(config: ServerConfig, backend: Backend) -> FastAPI:
    """The server app; it owns ``backend`` and closes it when the app shuts down."""
    server = _Server(config, backend)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            try:
                await server.history.aclose()
            finally:
                await backend.aclose()

    app = FastAPI(
        title="pacore",
        summary="OpenAI-compatible Parallel Coordinated Reasoning",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        # Every route may answer with these; FastAPI's 422 never happens (see errors.py).
        responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 413)},
    )
    app.state.pacore = server
    install_error_handlers(app)
    app.add_middleware(_Guard, server=server)

    @app.post(
        "/v1/chat/completions",
        # parse_body reads the body (stricter than FastAPI's parser), so its schema is declared here.
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(ChatCompletionRequest)}}}},
        responses={
            200: {"model": ChatCompletion, "content": {"text/event-stream": {}}},
            **{status: {"model": ErrorResponse} for status in (415, 429, 502, 503, 504)},
        },
    )  # fmt: skip
    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.body()
        except ClientDisconnect:
            # Gone while sending its request: nobody to answer, nothing to log.
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        plan = plan_request(
            parse_body(body, request.headers.get("content-type")),
            default=config.schedule,
            params=config.params,
            limits=config.limits,
        )
        run = server.admit(plan, request)
        if plan.stream:
            return _EventStream(run)
        try:
            result = await run.result()
        finally:
            run.close()
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        completion = completion_of(result, request_id=run.id, model=plan.model, trace_url=run.trace_url)
        return JSONResponse(completion.model_dump(mode="json"))

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in model_ids(server.model)])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model, "running": server.running}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=metrics_module.CONTENT_TYPE)

    @app.get("/ui", include_in_schema=False)
    @app.get("/ui/", include_in_schema=False)
    async def viewer() -> FileResponse:
        return FileResponse(
            str(STATIC_DIR / "index.html"),
            headers={
                # Model text is inserted as text by the page; this stops anything that slips through.
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
                "Cache-Control": "no-cache",
            },
        )

    app.mount("/ui/static", StaticFiles(directory=str(STATIC_DIR)), name="ui-static")

    @app.get("/ui/api/requests")
    async def recent_requests() -> dict[str, list[RequestSummary]]:
        return {"data": [record.summary() for record in server.history.recent()]}

    @app.get("/ui/api/requests/{request_id}")
    async def request_detail(request_id: str, since: int = Query(0, ge=0)) -> RequestDetail:
        record = server.history.get(request_id)
        if record is None:
            raise HTTPException(
                404, f"no request {request_id!r} in the history (the server keeps the last {config.history})"
            )
        return record.detail(since)

    app.openapi = _openapi_with_request_schemas(app)  # type: ignore[method-assign]
    return app


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _openapi_with_request_schemas(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema plus the chat request's models, without the 422 replies it never sends."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schemas = schema["components"]["schemas"]
            request = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(request.pop("$defs", {}), ChatCompletionRequest=request)
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
        return app.openapi_schema

    return openapi
