"""The OpenAI-compatible PaCoRe server: ``create_app(config, backend)``.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` and the trace viewer under ``/ui``. Every request runs
through :func:`pacore.engine.asolve` with the server's open backend; the
server only translates, limits and watches.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import (
    FileResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacore.adaptive import ComputePolicy
from pacore.backends.base import Backend, GenerationParams
from pacore.engine import asolve, check_policy
from pacore.errors import DeadlineExceededError, PacoreError, UsageError, shorten
from pacore.options import SolveOptions
from pacore.prompts import SynthesisTemplate
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
    RequestTimeoutError,
    ShuttingDownError,
    describe,
    install_error_handlers,
)
from pacore.server.history import (
    HistoryDatabase,
    RequestDetail,
    RequestHistory,
    RequestRecord,
    RequestSummary,
    SavedRecord,
)
from pacore.server.metrics import ServerMetrics
from pacore.server.protocol import ChatCompletion, ChatCompletionRequest, ErrorResponse, ModelCard, ModelList
from pacore.server.settings import DEFAULT_LIMITS, ServerSettings
from pacore.synthesis import ReferenceOrder
from pacore.trace import Event, Result

logger = logging.getLogger("pacore.server")
#: One line per chat completion request; ``pacore serve`` prints it.
access_logger = logging.getLogger("pacore.server.access")

STATIC_DIR = files("pacore.server") / "static"
#: Model text is inserted as text by the page; this stops anything that slips through.
VIEWER_CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
#: Routes anyone may open: the health probe and the viewer's static shell (it holds no data).
_PUBLIC_PATHS = ("/health", "/ui", "/ui/")
_PUBLIC_PREFIX = "/ui/static/"
#: After its deadline, a stream has this long to be written out before its slot is freed anyway.
_STREAM_WRITE_OUT_S = 2.0
#: Queued events a stream writes at most in one send (a bound on one write's size).
_COALESCED_EVENTS = 256
# Key of the request state where a handler leaves the status it ended with
# when that differs from the one sent (a stream that failed or lost its client).
_OUTCOME_KEY = "pacore_status"
_CHAT_PATH = "/v1/chat/completions"
#: Exceptions a chat completion may raise that :func:`describe` answers for the client; any other is a bug.
_MAPPED_ERRORS = (PacoreError, ValidationError)


@dataclass(frozen=True)
class ServerConfig(ServerSettings):
    """How a server answers; every field has a safe default.

    The settings ``pacore serve`` takes as flags are those of :class:`ServerSettings`.
    """

    #: Used when a request names no schedule.
    schedule: Schedule = field(default_factory=lambda: Schedule.parse("medium"))
    #: Defaults for sampling; a request's own fields override them.
    params: GenerationParams = field(default_factory=GenerationParams)
    template: SynthesisTemplate = field(default_factory=SynthesisTemplate.default)
    #: Used when a request names no ``pacore.reference_order``.
    reference_order: ReferenceOrder = "shuffle"
    #: Adaptive-compute policy used when a request names no ``pacore.compute`` (``None``: all off).
    compute: ComputePolicy | None = None
    #: Accepted bearer tokens; empty means no authentication.
    api_keys: tuple[str, ...] = ()
    max_messages: int = DEFAULT_LIMITS.max_messages
    max_content_parts: int = DEFAULT_LIMITS.max_content_parts
    max_model_chars: int = DEFAULT_LIMITS.max_model_chars
    max_json_values: int = DEFAULT_LIMITS.max_json_values
    #: Seconds a client refused for load is told to wait.
    retry_after_s: int = 5
    #: Seconds one request may run before it fails with a 504 (``None``: no limit).
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # the bounds of the settings pacore serve takes as flags
        for name in ("max_messages", "max_content_parts", "max_model_chars", "max_json_values"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise UsageError(f"deadline_s must be positive, got {self.deadline_s:g}")
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise UsageError(f"public_url must start with http:// or https://, got {shorten(self.public_url)!r}")
        if any(not key.strip() for key in self.api_keys):
            raise UsageError("an API key must not be empty")
        # The default must pass the server's own caps, or every plain request would be refused.
        check_limits(self.schedule, None, self.limits)

    @functools.cached_property
    def limits(self) -> Limits:
        """The per-request caps: the fields named as :class:`Limits`'s."""
        return Limits(**{cap.name: getattr(self, cap.name) for cap in fields(Limits)})


class _Server:
    """Everything the routes share: config, backend, history, metrics, load."""

    def __init__(self, config: ServerConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        #: What every request passes to the engine unless it says otherwise.
        self.options = SolveOptions(
            schedule=config.schedule, params=config.params, template=config.template,
            reference_order=config.reference_order, deadline=config.deadline_s, compute=config.compute,
        )  # fmt: skip
        self.metrics = ServerMetrics()
        database = None
        if config.history_db is not None and config.history:
            database = HistoryDatabase(config.history_db, config.history)
        self.history = RequestHistory(config.history, database, max_bytes=config.history_bytes, on_drop=self._forgotten)
        self.runs: set[_ChatRun] = set()
        #: Set when the server starts shutting down: new chat completions get a 503.
        self.draining = False

    def _forgotten(self, record: RequestRecord | SavedRecord) -> None:
        self.metrics.history_dropped.inc()
        # Once the history is full that is every request: counted in /metrics, logged for debugging only.
        logger.debug("history: forgot request %s (%s bytes) to stay within its limits", record.id, f"{record.size:,}")

    @property
    def model(self) -> str:
        return self.backend.model or "default"

    @property
    def running(self) -> int:
        return len(self.runs)

    def check_capacity(self) -> None:
        """Refuse a new chat completion now if it could not be admitted (cheap: before parsing it)."""
        if self.draining:
            raise ShuttingDownError("the server is shutting down and takes no new requests")
        if self.running >= self.config.max_concurrent_requests:
            raise OverloadedError(
                f"the server is answering {self.running} requests, its limit; retry in {self.config.retry_after_s}s",
                retry_after=self.config.retry_after_s,
            )

    def admit(self, plan: Plan, request: Request) -> _ChatRun:
        self.check_capacity()
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
        self.options = server.options.replace(
            schedule=plan.schedule, params=plan.params, stream_answer=plan.stream,
            reference_order=plan.reference_order or server.options.reference_order,
            compute=plan.compute or server.options.compute,
        )  # fmt: skip
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.trace_url = f"{(server.config.public_url or '').rstrip('/')}/ui#{self.id}"
        self.record = server.history.add(
            RequestRecord(
                self.id,
                plan.model,
                plan.schedule.as_list(),
                plan.messages,
                plan.stream,
                kind=plan.grading,
                template=server.config.template,
            )  # fmt: skip
        )
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.started = time.perf_counter()
        self.closed = False
        #: Why the server ended this run itself (shutdown), sent to the client.
        self.aborted: PacoreError | None = None
        #: Set when a stream's client is known to be gone: nothing more is written.
        self.client_gone = False
        server.runs.add(self)
        server.metrics.in_flight.inc()
        self.task = asyncio.create_task(self._solve())
        self.task.add_done_callback(lambda _: self.queue.put_nowait(None))
        # The engine stops at the deadline; a stream its client does not read could still
        # hold the slot while it waits to be written, so the slot is freed soon after anyway.
        deadline = server.config.deadline_s
        self._overdue = (
            asyncio.get_running_loop().call_later(deadline + _STREAM_WRITE_OUT_S, self._unwritten)
            if plan.stream and deadline is not None
            else None
        )

    def _unwritten(self) -> None:
        if self.closed:
            return
        self.server.metrics.clients_cut.labels(reason="deadline").inc()
        logger.info("freed the slot of %s: its stream was still unwritten %gs after its deadline", self.id,
                    _STREAM_WRITE_OUT_S)  # fmt: skip
        if not self.task.done():
            # The engine is still stopping at its deadline (a loaded machine): cancelling it
            # must not read as a shutdown to the client, who is owed the deadline's error.
            self.aborted = DeadlineExceededError(f"deadline of {self.server.config.deadline_s:g}s exceeded")
            self.record.finish("failed", str(self.aborted))
        self.close()

    async def _solve(self) -> Result:
        try:
            return await asolve(
                self.plan.messages, backend=self.server.backend, on_event=self._on_event, **self.options.as_kwargs()
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
        writer = ChunkWriter(
            request_id=self.id, model=self.plan.model, include_usage=self.plan.include_usage,
            policy=self.options.compute,
        )  # fmt: skip
        yield writer.opening()
        # Checked each time: once the client is gone, writes return at once and the queue may
        # never be empty, so this loop might never reach a point where it could be cancelled.
        while not self.client_gone and (event := await self.queue.get()) is not None:
            # A backlog (a fast backend's tokens) goes out as one write: the same bytes, fewer sends.
            pieces = writer.on_event(event)
            for _ in range(_COALESCED_EVENTS):
                if self.queue.empty() or (event := self.queue.get_nowait()) is None:
                    break
                pieces.extend(writer.on_event(event))
            if pieces:
                yield "".join(pieces)
            if event is None:
                break
            if not self.queue.empty():
                await asyncio.sleep(0)  # a backlog still: let the loop run between writes (and see a disconnect)
        if self.client_gone:
            return
        if (exc := self._error()) is not None:
            reply = describe(exc)
            setattr(self.request.state, _OUTCOME_KEY, reply.status)
            yield reply.sse_event()
            return
        yield "".join(writer.closing(self.task.result(), self.trace_url))  # one write

    def close(self) -> None:
        """Release the slot; cancel the engine (all its backend calls) if still running."""
        if self.closed:
            return
        self.closed = True
        if self._overdue is not None:
            self._overdue.cancel()
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
        async def watched() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.run.client_gone = True
            return message

        try:
            await super().__call__(scope, watched, send)
        finally:
            # Starlette cancels the body when the client disconnects; the
            # engine task runs apart from it and must be cancelled here.
            self.run.close()


_ChatEndpoint = Callable[[Request], Coroutine[Any, Any, Response]]


class _Guard:
    """ASGI middleware: API keys, the body size limit and per-request counting.

    It also serves chat completions itself, calling ``chat`` here, past the
    layers of Starlette and FastAPI (their error middleware, router and
    request wrappers): with the faster parsing of stream chunks, about 5% of
    the server CPU a pass-through request costs (docs/latency.md). Errors are
    mapped by :func:`describe` as the app's handlers map them.
    """

    def __init__(self, app: ASGIApp, server: _Server, chat: _ChatEndpoint) -> None:
        self.app = app
        self.server = server
        self.chat = chat
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

        started = time.perf_counter()
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await describe(refusal).response()(scope, receive, send_counted)
                return
            if scope["path"] == _CHAT_PATH and scope["method"] == "POST":
                await self._serve_chat(scope, self._limited(receive), send_counted)
            else:
                await self.app(scope, self._limited(receive), send_counted)
        finally:
            status = state.get(_OUTCOME_KEY, sent["status"])
            endpoint = _endpoint(scope["path"])
            self.server.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            if endpoint == _CHAT_PATH and access_logger.isEnabledFor(logging.INFO):
                access_logger.info(
                    "%s", _access_line(status, state.get("pacore_run"), time.perf_counter() - started,
                                       self.server.config.log_content),
                )  # fmt: skip

    async def _serve_chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await self.chat(request)
        except Exception as exc:
            await describe(exc).response()(scope, receive, send)
            if not isinstance(exc, _MAPPED_ERRORS):
                raise  # a bug: answered with a 500, then logged with its traceback by the server
            return
        await response(scope, receive, send)

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
        """``receive`` that fails once the body grows past the size limit, or is not all in by the body timeout."""
        config = self.server.config
        received = 0
        complete = False
        deadline: float | None = None

        async def limited() -> Message:
            nonlocal received, complete, deadline
            if complete:
                return await receive()  # only a disconnect can come now
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + config.body_timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                self.server.metrics.clients_cut.labels(reason="body_timeout").inc()
                raise RequestTimeoutError(
                    f"the request body did not arrive within {config.body_timeout_s:g}s"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > config.max_body_bytes:
                    raise self._too_large()
                complete = not message.get("more_body", False)
            return message

        return limited


def _access_line(status: int, run: _ChatRun | None, seconds: float, content: bool) -> str:
    """``200 chatcmpl-... model=pacore-2/m schedule=2 tokens=345 1.23s``: never a key, content only if asked."""
    if run is None:  # refused before it was admitted
        return f"{status} - {seconds:.3f}s"
    record = run.record
    line = (
        f"{status} {run.id} model={shorten(run.plan.model, 60)} schedule={run.plan.schedule} "
        f"tokens={record.usage.total_tokens} {seconds:.3f}s"
    )
    if content:
        answer = record.answer if record.answer is not None else record.error or ""
        line += f" question={json.dumps(shorten(record.question, 200))} answer={json.dumps(shorten(answer, 200))}"
    return line


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _endpoint(path: str) -> str:
    """A bounded label for a path (no ids, no arbitrary 404 paths)."""
    if path.startswith("/ui/api/requests/"):
        return "/ui/api/requests/{id}"
    if path.startswith("/ui/api/traces/"):
        return "/ui/api/traces/{id}"
    if path.startswith(_PUBLIC_PREFIX):
        return "/ui/static"
    known = (_CHAT_PATH, "/v1/models", "/health", "/metrics", "/openapi.json", "/ui", "/ui/api/requests")
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
    # Starlette's own trailing-slash redirect builds its Location from the Host header.
    app.router.redirect_slashes = False
    app.add_exception_handler(404, _redirect_to_slash_twin)

    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.body()
        except ClientDisconnect:
            # Gone while sending its request: nobody to answer, nothing to log.
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        # Refused for load before any parsing: an overloaded server does no work for a request.
        server.check_capacity()
        plan = plan_request(
            parse_body(body, request.headers.get("content-type"), config.limits),
            default=config.schedule,
            params=config.params,
            limits=config.limits,
        )
        policy = plan.compute or server.options.compute
        if policy is not None:  # a 400 now, not an error event inside a streamed 200
            check_policy(policy, plan.schedule, plan.params)
        run = server.admit(plan, request)
        request.state.pacore_run = run
        if plan.stream:
            return _EventStream(run)
        try:
            result = await run.result()
        finally:
            run.close()
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        completion = completion_of(
            result, request_id=run.id, model=plan.model, trace_url=run.trace_url, policy=run.options.compute
        )
        # Serialized by pydantic in one pass, not dumped to dicts and then encoded by json.
        return Response(completion.model_dump_json(), media_type="application/json")

    app.add_middleware(_Guard, server=server, chat=chat_completions)
    # The guard serves POST requests; the route gives the OpenAPI entry and a 405 to other methods.
    app.router.add_api_route(
        _CHAT_PATH,
        chat_completions,
        methods=["POST"],
        # parse_body reads the body (stricter than FastAPI's parser), so its schema is declared here.
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(ChatCompletionRequest)}}}},
        responses={
            200: {"model": ChatCompletion, "content": {"text/event-stream": {}}},
            **{status: {"model": ErrorResponse} for status in (415, 429, 502, 503, 504)},
        },
    )  # fmt: skip

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in model_ids(server.model)])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model, "running": server.running}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=metrics_module.CONTENT_TYPE)

    mount_viewer(app)

    @app.get("/ui/api/requests")
    async def recent_requests() -> HistoryListing:
        history = server.history
        return HistoryListing(
            data=[record.summary() for record in history.recent()],
            dropped=history.dropped,
            bytes=history.size,
            max_bytes=config.history_bytes,
        )

    def kept(request_id: str) -> RequestRecord | SavedRecord:
        record = server.history.get(request_id)
        if record is None:
            raise HTTPException(
                404,
                f"no request {shorten(request_id)!r} in the history (the server keeps the last {config.history}, "
                f"up to {config.history_bytes:,} bytes)",
            )
        return record

    @app.get("/ui/api/requests/{request_id}")
    async def request_detail(request_id: str, since: int = Query(0, ge=0)) -> RequestDetail:
        return kept(request_id).detail(since)

    @app.get("/ui/api/traces/{request_id}")
    async def request_trace(request_id: str) -> RequestDetail:
        """The whole trace as the history keeps it, for the viewer's JSON download."""
        return kept(request_id).detail()

    app.openapi = _openapi_with_request_schemas(app)  # type: ignore[method-assign]
    return app


def mount_viewer(app: FastAPI) -> None:
    """The viewer's page at ``/ui`` and its files under ``/ui/static``, all with the viewer's CSP."""

    @app.get("/ui", include_in_schema=False)
    @app.get("/ui/", include_in_schema=False)
    async def viewer() -> FileResponse:
        return FileResponse(
            str(STATIC_DIR / "index.html"),
            headers={"Content-Security-Policy": VIEWER_CSP, "Cache-Control": "no-cache"},
        )

    app.mount("/ui/static", _ViewerFiles(directory=str(STATIC_DIR)), name="ui-static")


class _ViewerFiles(StaticFiles):
    """The viewer's static files, each with the viewer's Content-Security-Policy."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Content-Security-Policy"] = VIEWER_CSP
        return response


class HistoryListing(BaseModel):
    """``/ui/api/requests``: the requests kept, newest first, and what the history had to forget."""

    data: list[RequestSummary]
    #: Requests forgotten since the server started, to stay within ``--history`` and ``--history-bytes``.
    dropped: int
    #: What the kept requests hold, about, and the budget.
    bytes: int
    max_bytes: int


async def _redirect_to_slash_twin(request: Request, exc: Exception) -> Response:
    """A 404 whose path with (or without) a trailing slash exists: a relative redirect there."""
    path = request.scope["path"]
    if path != "/":
        twin = {**request.scope, "path": path[:-1] if path.endswith("/") else path + "/"}
        if any(route.matches(twin)[0] is not Match.NONE for route in request.app.router.routes):
            query = request.scope.get("query_string", b"").decode("latin-1")
            # A path only, never a host: the Host header is the client's to make up.
            return RedirectResponse(twin["path"] + (f"?{query}" if query else ""), status_code=307)
    return describe(exc).response()


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _openapi_with_request_schemas(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema plus the chat request's models, without the 422 replies it never sends."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # FastAPI keeps this dict as app.openapi_schema: edited in place, once
        schemas = schema["components"]["schemas"]
        request = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(request.pop("$defs", {}), ChatCompletionRequest=request)
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        return schema

    return openapi
