"""A backend for any OpenAI-compatible ``/v1/chat/completions`` server.

vLLM, SGLang, llama.cpp's server, llama-cpp-python's server and hosted APIs
all speak this protocol. One pool of keep-alive connections serves every
call of the backend, since a PaCoRe round fans out tens to hundreds of
calls at once.

``n`` batching: servers that honour ``n`` (vLLM, SGLang) read a shared prompt
once for all of a call's samples, so a round is best sent as one call. Others
ignore ``n`` (llama.cpp returns one choice) or refuse it (HTTP 400). With
``n_mode="auto"`` the backend starts at ``max_n = 128`` (OpenAI's own cap on
``n``) and learns from the first call that asks for several samples: fewer
choices than asked lower ``max_n`` to what came back, a 400 that a plain
single-sample call does not reproduce lowers it to 1. The missing samples are
then fetched as parallel single calls, so nothing is wasted.
``n_mode="on"`` always sends ``n``; ``"off"`` always fans out single calls.

Token accounting when one call returns several choices: servers report one
``usage`` per call. Its prompt tokens are attributed to the first choice (the
prompt was read once), and its completion tokens are split between the
choices in proportion to the length of their text and reasoning, so per-call
and per-request sums stay exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal, TypeVar

import httpx

from pacore.backends.base import (
    BaseBackend,
    Completion,
    DeltaCallback,
    GenerationParams,
    Message,
    RetryPolicy,
    current_retry_budget,
    offset_seed,
    retry_elsewhere,
)
from pacore.errors import BackendError, UsageError

logger = logging.getLogger(__name__)

NMode = Literal["auto", "on", "off"]
T = TypeVar("T")

API_KEY_ENV_VARS = ("PACORE_API_KEY", "OPENAI_API_KEY")
#: Seconds one call may take; a long reasoning trajectory easily needs many minutes.
DEFAULT_TIMEOUT_S = 1800.0
CONNECT_TIMEOUT_S = 10.0
#: Concurrent connections to the server: a whole round should be in flight at once.
DEFAULT_MAX_CONNECTIONS = 256
#: OpenAI's own upper bound on ``n``; used until a server shows a smaller one.
MAX_N = 128
# Longest server error message quoted in our one-line errors.
_DETAIL_CHARS = 300


def normalize_base_url(url: str) -> httpx.URL:
    """The server's API root: ``http://host:port`` gets ``/v1``; endpoint suffixes go."""
    try:
        parsed = httpx.URL(url.strip())
    except httpx.InvalidURL as exc:
        raise UsageError(f"invalid backend URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UsageError(f"invalid backend URL {url!r}: expected http(s)://host[:port][/v1]")
    path = parsed.path.rstrip("/").removesuffix("/chat/completions").removesuffix("/models")
    return parsed.copy_with(path=path or "/v1", fragment=None)


class OpenAIBackend(BaseBackend):
    """An OpenAI-compatible chat completions server.

    ``base_url`` is the API root (``http://127.0.0.1:8000/v1``; ``/v1`` is
    added when the URL has no path). ``model`` defaults to the first model the
    server lists. ``api_key`` defaults to ``$PACORE_API_KEY``, then
    ``$OPENAI_API_KEY``. ``timeout`` bounds each attempt of a call (seconds, or
    an ``httpx.Timeout``). ``transport`` replaces the network (tests, proxies).
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy = RetryPolicy(),
        n_mode: NMode = "auto",
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if n_mode not in ("auto", "on", "off"):
            raise UsageError(f"n_mode must be 'auto', 'on' or 'off', got {n_mode!r}")
        if max_connections < 1:
            raise UsageError(f"max_connections must be at least 1, got {max_connections}")
        self.base_url = normalize_base_url(base_url)
        # Shown in names and errors: no user:password, no query (either may hold a secret).
        self.display_url = str(self.base_url.copy_with(userinfo=b"", query=None))
        self.model = model or ""
        self.name = self._name()
        self.n_mode = n_mode
        #: Samples asked for in one call; see the module docstring for how it is learnt.
        self.max_n = 1 if n_mode == "off" else MAX_N
        self.retry = retry
        self._api_key = api_key or next(
            (os.environ[var] for var in API_KEY_ENV_VARS if os.environ.get(var)), None
        )
        self._n_confirmed = False
        self._chat_url = self._endpoint("/chat/completions")
        self._models_url = self._endpoint("/models")
        if not isinstance(timeout, httpx.Timeout):
            connect = CONNECT_TIMEOUT_S if timeout is None else min(timeout, CONNECT_TIMEOUT_S)
            # pool=None: waiting for a free connection is queueing, not a failure.
            timeout = httpx.Timeout(timeout, connect=connect, pool=None)
        self._read_timeout = timeout.read
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        self._max_connections = max_connections
        self._client_options: dict[str, Any] = dict(headers=headers, timeout=timeout, transport=transport)
        self._client: _ConnectionPool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._model_lock = asyncio.Lock()

    def _name(self) -> str:
        return f"openai {self.display_url}" + (f" ({self.model})" if self.model else "")

    def _endpoint(self, suffix: str) -> httpx.URL:
        return self.base_url.copy_with(path=self.base_url.path + suffix)

    def _http(self) -> _ConnectionPool:
        """The shared connection pool of the running event loop.

        Pooled connections belong to the loop that opened them, so a backend
        reused by several ``asyncio.run`` calls (``pacore.solve`` in a loop)
        starts a fresh pool in each.
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._client is None:
            self._client = _ConnectionPool(self._max_connections, self._client_options)
            self._model_lock = asyncio.Lock()
            self._loop = loop
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()

    # --- public calls ---------------------------------------------------------

    async def generate(
        self, messages: Sequence[Message], n: int, params: GenerationParams
    ) -> list[Completion]:
        model = self.model or await self._discover_model()
        request = _ChatRequest(messages, _fields(model, params))
        return await self._sample(request, params.seed, n)

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams, on_delta: DeltaCallback
    ) -> Completion:
        model = self.model or await self._discover_model()
        fields = _fields(model, params)
        fields["stream"] = True
        fields["stream_options"] = {"include_usage": True}
        payload = _ChatRequest(messages, fields).payload(1, params.seed)
        started = time.perf_counter()
        _count_call()
        failures: list[str] = []
        attempt = 0
        while True:
            attempt += 1
            state = _StreamState()
            try:
                await self._stream_once(payload, state, on_delta)
                completion = state.completion(time.perf_counter() - started)
                completion.failed_attempts = tuple(failures)
                return completion
            except httpx.RequestError as exc:
                error = self._transport_error(exc)
            except BackendError as exc:
                error = exc
            # Deltas already delivered cannot be taken back, so only a stream
            # that failed before its first delta is retried.
            if state.chunks:
                raise error
            await self._before_retry(error, attempt, failures)

    # --- sampling ---------------------------------------------------------------

    async def _sample(self, request: _ChatRequest, seed: int | None, n: int) -> list[Completion]:
        """``n`` samples; when they are split over calls, sample ``i`` is seeded ``seed + i``."""
        if n == 1 or self.max_n == 1:
            return await self._singles(request, seed, n)
        asked = min(n, self.max_n)
        try:
            completions = await self._call(request, asked, seed)
        except BackendError as exc:
            if exc.kind != "bad_request" or self.n_mode != "auto" or self._n_confirmed:
                raise
            # Maybe the server refuses ``n`` itself: a single-sample call tells
            # (and raises the server's real complaint if it was something else).
            completions = await self._call(request, 1, seed)
            self._learn_max_n(1, f"it refused n={asked} ({exc})")
        else:
            if len(completions) < asked:
                self._learn_max_n(len(completions), f"it returned {len(completions)} of {asked} choices")
            elif self.n_mode == "auto":
                self._n_confirmed = True
        if len(completions) < n:
            rest = await self._sample(request, offset_seed(seed, len(completions)), n - len(completions))
            completions += rest
        return completions

    def _learn_max_n(self, returned: int, why: str) -> None:
        if self.n_mode == "auto" and returned < self.max_n:
            self.max_n = max(1, returned)
            logger.info("backend %s: asking for at most n=%d, since %s", self.display_url, self.max_n, why)

    async def _singles(self, request: _ChatRequest, seed: int | None, n: int) -> list[Completion]:
        """``n`` parallel single-sample calls; failed calls become failed samples."""
        if n == 1:
            return await self._call(request, 1, seed)
        outcomes = await asyncio.gather(
            *(self._call(request, 1, offset_seed(seed, i)) for i in range(n)), return_exceptions=True
        )
        completions: list[Completion] = []
        errors: list[BackendError] = []
        for outcome in outcomes:
            if isinstance(outcome, BackendError):
                if outcome.fatal:
                    raise outcome
                errors.append(outcome)
                completions.append(Completion(text="", error=str(outcome), error_kind=outcome.kind))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                completions.extend(outcome)
        if len(errors) == n:
            raise errors[0]
        return completions

    async def _call(self, request: _ChatRequest, n: int, seed: int | None) -> list[Completion]:
        started = time.perf_counter()
        failures: list[str] = []
        completions = await self._request(
            "POST", self._chat_url, request.payload(n, seed), lambda data: self._parse_chat(data, n), failures
        )
        latency_s = time.perf_counter() - started
        failed_attempts = tuple(failures)
        for completion in completions:
            completion.latency_s = latency_s
            completion.failed_attempts = failed_attempts
        return completions

    def _parse_chat(self, data: Any, asked: int) -> list[Completion]:
        """The choices of a chat completion, with its usage attributed per choice."""
        try:
            choices = data["choices"]
            if len(choices) > 1:
                choices = sorted(choices, key=lambda choice: choice.get("index", 0))[:asked]
            completions = [
                _choice_completion(choice["message"], choice.get("finish_reason")) for choice in choices
            ]
            usage = data.get("usage")
            if not usage:
                # Accept the answer; estimate what it cost rather than count it as free.
                for completion in completions:
                    completion.completion_tokens = _estimated_tokens(completion)
                return completions
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
            completions[0].prompt_tokens = prompt_tokens
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            detail = _error_detail(data)
            raise BackendError(
                f"backend {self.display_url} answered with no valid chat completion"
                + (f": {self._redact(detail)}" if detail else ""),
                kind="protocol",
            ) from None
        if len(completions) == 1:
            completions[0].completion_tokens = completion_tokens
        else:
            weights = [len(c.text) + len(c.reasoning or "") for c in completions]
            for completion, share in zip(completions, _proportional(completion_tokens, weights), strict=True):
                completion.completion_tokens = share
        return completions

    async def _discover_model(self) -> str:
        self._http()  # the lock below belongs to the running loop
        async with self._model_lock:
            if not self.model:
                try:
                    ids = await self._request("GET", self._models_url, None, _model_ids)
                except BackendError as exc:
                    if exc.kind != "not_found":
                        raise
                    raise BackendError(
                        f"backend {self.display_url} does not list its models (HTTP 404); "
                        "check the URL or name the model (--model)",
                        kind="not_found",
                        status_code=404,
                    ) from None
                if not ids:
                    raise BackendError(
                        f"backend {self.display_url} lists no models; name one (--model)", kind="not_found"
                    )
                self.model = ids[0]
                self.name = self._name()
        return self.model

    # --- HTTP, retries and errors ------------------------------------------------

    async def _request(
        self,
        method: str,
        url: httpx.URL,
        payload: bytes | None,
        check: Callable[[Any], T],
        failures: list[str] | None = None,
    ) -> T:
        """One JSON request with retries; ``check`` validates the parsed answer.

        The label of each failed attempt that is retried is added to ``failures``.
        """
        _count_call()
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http().request(method, url, content=payload)
                if not 200 <= response.status_code < 300:
                    raise self._status_error(response)
                try:
                    data = response.json()
                except ValueError:
                    raise BackendError(
                        f"backend {self.display_url} returned malformed JSON (HTTP {response.status_code})",
                        kind="protocol",
                    ) from None
                return check(data)
            except httpx.RequestError as exc:
                error = self._transport_error(exc)
            except BackendError as exc:
                error = exc
            await self._before_retry(error, attempt, failures)

    async def _before_retry(self, error: BackendError, attempt: int, failures: list[str] | None) -> None:
        """Raise ``error`` if it is final, else note it in ``failures`` and wait as the retry policy says."""
        if not self._retryable(error):
            raise error
        elsewhere = retry_elsewhere.get()
        if elsewhere is not None and elsewhere(error):
            raise error  # a router retries the call on another endpoint
        if attempt >= self.retry.max_attempts:
            if attempt > 1:
                error.args = (f"{error}; gave up after {attempt} attempts",)
            raise error
        budget = current_retry_budget.get()
        if budget is not None and not budget.spend(self.retry):
            error.args = (f"{error}; not retried: the request's retry budget is spent",)
            raise error
        if failures is not None:
            failures.append(error.label)
        delay = self.retry.delay(attempt, error.retry_after, random.random())
        logger.info("backend call failed (%s); retry %d in %.2fs", error, attempt, delay)
        await asyncio.sleep(delay)

    def _retryable(self, error: BackendError) -> bool:
        if error.kind == "status":
            return error.status_code in self.retry.retry_statuses
        return error.kind in ("connect", "timeout", "protocol")

    def _transport_error(self, exc: httpx.RequestError) -> BackendError:
        where = f"backend {self.display_url}"
        if isinstance(exc, httpx.ConnectTimeout):
            return BackendError(f"{where} is unreachable (connection timed out)", kind="connect")
        if isinstance(exc, httpx.TimeoutException):
            limit = f" within {self._read_timeout:g}s" if self._read_timeout else ""
            return BackendError(f"{where} did not answer{limit}", kind="timeout")
        if isinstance(exc, httpx.ConnectError):
            return BackendError(f"{where} is unreachable ({_reason(exc)})", kind="connect")
        if isinstance(exc, httpx.TransportError):
            return BackendError(f"connection to {where} failed ({_reason(exc)})", kind="connect")
        # Not the connection's fault: an undecodable body, a redirect loop...
        return BackendError(f"{where} sent an unusable answer ({_reason(exc)})", kind="protocol")

    def _status_error(self, response: httpx.Response) -> BackendError:
        status = response.status_code
        detail = self._redact(_error_detail(_json_or_text(response)))
        suffix = f": {detail}" if detail else ""
        if status in (401, 403):
            if self._api_key:
                message = f"backend rejected the API key (HTTP {status}){suffix}"
            else:
                message = (
                    f"backend requires an API key (HTTP {status}); set PACORE_API_KEY or pass "
                    f"--api-key{suffix}"
                )
            return BackendError(message, kind="auth", status_code=status)
        if status == 404:
            if self.model and ("model" in detail.lower() or self.model in detail):
                message = f"model '{self.model}' not found on backend (HTTP 404){suffix}"
            else:
                message = (
                    f"backend has no {response.request.url.path} (HTTP 404); check the URL, "
                    f"which usually ends in /v1{suffix}"
                )
            return BackendError(message, kind="not_found", status_code=status)
        if status in self.retry.retry_statuses or status >= 500:
            return BackendError(
                f"backend {self.display_url} answered HTTP {status}{suffix}",
                kind="status",
                status_code=status,
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
        return BackendError(
            f"backend rejected the request (HTTP {status}){suffix}", kind="bad_request", status_code=status
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key and text else text

    # --- streaming ------------------------------------------------------------------

    async def _stream_once(self, payload: bytes, state: _StreamState, on_delta: DeltaCallback) -> None:
        async with self._http().stream("POST", self._chat_url, content=payload) as response:
            if not 200 <= response.status_code < 300:
                await response.aread()
                raise self._status_error(response)
            try:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, ": ping" comments, event names
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    if not data:
                        continue
                    try:
                        content, reasoning = state.feed(data)
                    except (ValueError, TypeError, AttributeError) as exc:
                        raise BackendError(
                            f"backend {self.display_url} sent a malformed stream chunk ({exc})",
                            kind="protocol",
                        ) from None
                    if content or reasoning:
                        on_delta(content, reasoning)
                    if state.error is not None:
                        break
            except httpx.TimeoutException:
                raise
            except httpx.TransportError as exc:
                raise self._truncated(f"the connection broke: {_reason(exc)}") from None
        if state.error is not None:
            raise BackendError(
                f"backend {self.display_url} reported an error mid-stream: {self._redact(state.error)}",
                kind="status",
            )
        if state.finish_reason is None:
            raise self._truncated("no finish reason")

    def _truncated(self, why: str) -> BackendError:
        return BackendError(
            f"backend {self.display_url} ended the stream before the completion finished ({why})",
            kind="protocol",
        )


class _ConnectionPool:
    """Keep-alive connections on a free list, each its own one-connection ``httpx.AsyncClient``.

    httpcore's pool rescans every connection it holds, and every queued
    request, on each request: with a round's hundreds of calls in flight in
    one client that costs milliseconds of CPU per call, several times the
    call itself (``bench/orchestration.py``). Here a call takes an idle
    connection in constant time; calls beyond ``size`` wait on a semaphore.
    """

    def __init__(self, size: int, options: dict[str, Any]) -> None:
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        # One TLS context for all: building one per client costs milliseconds.
        self._options = {"verify": httpx.create_ssl_context(), **options, "limits": one}
        self._gate = asyncio.Semaphore(size)
        self._idle: list[httpx.AsyncClient] = []
        self._clients: list[httpx.AsyncClient] = []
        self._closing: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def _lease(self) -> AsyncIterator[httpx.AsyncClient]:
        async with self._gate:
            client = self._idle.pop() if self._idle else self._open()
            try:
                yield client
            except BaseException:
                # A call cut short (cancelled, reset, timed out) can leave the
                # connection half-used, and httpcore would hand it out again and
                # hang (encode/httpcore#1093): never reuse it.
                self._discard(client)
                raise
            self._idle.append(client)

    def _discard(self, client: httpx.AsyncClient) -> None:
        self._clients.remove(client)
        closing = asyncio.get_running_loop().create_task(client.aclose())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    def _open(self) -> httpx.AsyncClient:
        client = httpx.AsyncClient(**self._options)
        self._clients.append(client)
        return client

    async def request(self, method: str, url: httpx.URL, *, content: bytes | None) -> httpx.Response:
        async with self._lease() as client:
            return await client.request(method, url, content=content)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: httpx.URL, *, content: bytes) -> AsyncIterator[httpx.Response]:
        async with self._lease() as client, client.stream(method, url, content=content) as response:
            yield response

    async def aclose(self) -> None:
        clients, self._clients, self._idle = self._clients, [], []
        await asyncio.gather(*(client.aclose() for client in clients), *self._closing)


class _ChatRequest:
    """A chat request whose messages are serialized once for all of its calls."""

    __slots__ = ("messages_json", "fields")

    def __init__(self, messages: Sequence[Message], fields: dict[str, Any]) -> None:
        self.messages_json = _dumps(list(messages))
        self.fields = fields

    def payload(self, n: int, seed: int | None) -> bytes:
        fields = self.fields
        if n > 1 or seed is not None:
            fields = {**fields, "n": n} if n > 1 else dict(fields)
            if seed is not None:
                fields["seed"] = seed
        # ``fields`` always holds the model, so its JSON object is never empty.
        return b'{"messages":' + self.messages_json + b"," + _dumps(fields)[1:]


def _fields(model: str, params: GenerationParams) -> dict[str, Any]:
    fields: dict[str, Any] = {"model": model, "temperature": params.temperature, "top_p": params.top_p}
    if params.max_tokens is not None:
        fields["max_tokens"] = params.max_tokens
    if params.stop:
        fields["stop"] = list(params.stop)
    fields.update(params.extra)
    return fields


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class _StreamState:
    """What a stream has delivered so far."""

    __slots__ = ("text", "reasoning", "finish_reason", "usage", "chunks", "error")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.chunks = 0
        self.error: str | None = None

    def feed(self, data: str) -> tuple[str, str]:
        """Take one SSE ``data`` field; returns its ``(content, reasoning)`` delta."""
        chunk = json.loads(data)
        if chunk.get("error"):
            self.error = _error_detail(chunk) or "unknown error"
            return "", ""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        content = reasoning = ""
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            content = delta.get("content") or ""
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            if content or reasoning:
                self.chunks += 1
                if content:
                    self.text.append(content)
                if reasoning:
                    self.reasoning.append(reasoning)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return content, reasoning

    def completion(self, latency_s: float) -> Completion:
        usage = self.usage or {}
        return Completion(
            text="".join(self.text),
            reasoning="".join(self.reasoning) or None,
            finish_reason=self.finish_reason,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            # Without a usage chunk (the server ignored include_usage), count
            # the chunks that carried text: servers send about one token each,
            # so this approximates the generated tokens.
            completion_tokens=int(usage.get("completion_tokens") or 0) if self.usage else self.chunks,
            latency_s=latency_s,
        )


def _choice_completion(message: dict[str, Any], finish_reason: str | None) -> Completion:
    return Completion(
        text=message.get("content") or "",
        reasoning=message.get("reasoning_content") or message.get("reasoning") or None,
        finish_reason=finish_reason,
    )


def _count_call() -> None:
    """Count a call against the running request's retry budget (each call earns it retries)."""
    budget = current_retry_budget.get()
    if budget is not None:
        budget.calls += 1


def _estimated_tokens(completion: Completion) -> int:
    """Tokens of a completion whose server reported no usage, at about 4 characters a token."""
    return -(-(len(completion.text) + len(completion.reasoning or "")) // 4)


def _proportional(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` into integers that sum to it."""
    weight_sum = sum(weights)
    if weight_sum == 0:
        weights, weight_sum = [1] * len(weights), len(weights)
    shares, cumulative, given = [], 0, 0
    for weight in weights:
        cumulative += weight
        upto = round(total * cumulative / weight_sum)
        shares.append(upto - given)
        given = upto
    return shares


def _model_ids(data: Any) -> list[str]:
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise BackendError("backend answered GET /models with no model list", kind="protocol")
    return [m["id"] for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)]


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _error_detail(body: Any) -> str:
    """The server's own error message, on one line and short."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            body = error.get("message") or error
        elif error:
            body = error
        else:
            body = body.get("detail") or body.get("message") or ""
    text = " ".join(str(body).split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _reason(exc: BaseException) -> str:
    """Why a connection failed, in a few words (the OS error under httpx's)."""
    seen: BaseException | None = exc
    for _ in range(8):  # exception chains are short; this also ends a cyclic one
        if seen is None:
            break
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return "unknown host name"
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
        seen = seen.__cause__ or seen.__context__
    return str(exc).rstrip(".").lower() or type(exc).__name__
