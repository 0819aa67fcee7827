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

Streaming: every call asks for a stream (``stream: true`` with
``stream_options.include_usage``), ``n`` > 1 included (choices are told
apart by their ``index``), so ``timeout`` limits how long the server may stay
silent, not how long a call may run: a 131k-token trajectory that keeps
producing tokens is never cut. A server that answers plain JSON anyway is
read as a normal completion; one that refuses ``stream`` (HTTP 400 where the
same call without it works) is called without it from then on. A stream
that breaks part way is retried from scratch as any failed attempt, since
its text has gone nowhere yet; only :meth:`OpenAIBackend.stream`, whose
deltas were already shown to a consumer, keeps the partial text in a failed
completion instead. One call may receive at most ``max_reply_bytes``.

Context overflow: when prompt plus ``max_tokens`` exceed the model's context,
vLLM, SGLang and llama.cpp answer HTTP 400 (see :func:`context_overflow`).
The call is retried once with ``max_tokens`` lowered to what fits, when the
message gives the figures, or without ``max_tokens`` otherwise; when the
prompt alone does not fit, that call fails with kind ``context`` (its
trajectories fail, the round goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import random
import re
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal, TypeVar

import httpx
from pydantic_core import from_json

from pacore.backends.base import (
    BaseBackend,
    Completion,
    DeltaCallback,
    GenerationParams,
    Listeners,
    Message,
    RetryPolicy,
    current_retry_budget,
    offset_seed,
    retry_elsewhere,
)
from pacore.backends.http11 import LeanTransport
from pacore.confidence import token_confidence
from pacore.errors import BackendError, ContextOverflowError, UsageError

logger = logging.getLogger(__name__)

NMode = Literal["auto", "on", "off"]
T = TypeVar("T")

API_KEY_ENV_VARS = ("PACORE_API_KEY", "OPENAI_API_KEY")
#: Seconds a call may go without receiving a byte (calls stream, so a long one is never cut).
DEFAULT_TIMEOUT_S = 1800.0
CONNECT_TIMEOUT_S = 10.0
#: Concurrent connections to the server: a whole round should be in flight at once.
DEFAULT_MAX_CONNECTIONS = 256
#: OpenAI's own upper bound on ``n``; used until a server shows a smaller one.
MAX_N = 128
#: Most bytes one call may receive: a 131k-token trajectory streams a few MB; far more is a broken server.
DEFAULT_MAX_REPLY_BYTES = 64 * 1024 * 1024
#: Tokens left free below the context when ``max_tokens`` is lowered after an overflow.
CONTEXT_MARGIN_TOKENS = 16
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
    ``$OPENAI_API_KEY``. ``timeout`` is an inactivity limit (seconds, or an
    ``httpx.Timeout``): an attempt fails when the server sends nothing for
    that long, however long the whole call takes, since calls stream.
    ``max_reply_bytes`` caps what one call may receive; a longer answer is a
    failed sample (kind ``too_large``). ``transport`` replaces the network
    (tests, proxies).
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
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if n_mode not in ("auto", "on", "off"):
            raise UsageError(f"n_mode must be 'auto', 'on' or 'off', got {n_mode!r}")
        if max_connections < 1:
            raise UsageError(f"max_connections must be at least 1, got {max_connections}")
        if max_reply_bytes < 1:
            raise UsageError(f"max_reply_bytes must be at least 1, got {max_reply_bytes}")
        self.base_url = normalize_base_url(base_url)
        # Shown in names and errors: no user:password, no query (either may hold a secret).
        self.display_url = str(self.base_url.copy_with(userinfo=b"", query=None))
        self.model = model or ""
        self.name = self._name()
        self.n_mode = n_mode
        #: Samples asked for in one call; see the module docstring for how it is learnt.
        self.max_n = 1 if n_mode == "off" else MAX_N
        self.retry = retry
        self.max_reply_bytes = max_reply_bytes
        self._api_key = api_key or next((os.environ[var] for var in API_KEY_ENV_VARS if os.environ.get(var)), None)
        self._n_confirmed = False
        #: The server refused ``logprobs`` once (HTTP 400 naming it): calls go on without them.
        self._refuses_logprobs = False
        #: ``None`` until a call shows whether the server streams; ``False`` once it refused ``stream``.
        self._streams: bool | None = None
        self._chat_url = self._endpoint("/chat/completions")
        self._models_url = self._endpoint("/models")
        if not isinstance(timeout, httpx.Timeout):
            connect = CONNECT_TIMEOUT_S if timeout is None else min(timeout, CONNECT_TIMEOUT_S)
            # pool=None: waiting for a free connection is queueing, not a failure.
            # read=timeout is per read, so a stream that keeps sending is never cut.
            timeout = httpx.Timeout(timeout, connect=connect, pool=None)
        self._read_timeout = timeout.read
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        self._max_connections = max_connections
        self._client_options: dict[str, Any] = dict(headers=headers, timeout=timeout, transport=transport)
        # Plain http:// with no proxy to honour: the lean transport (see pacore.backends.http11).
        proxies = {scheme for scheme in urllib.request.getproxies() if scheme != "no"}  # NO_PROXY alone names none
        self._lean = transport is None and self.base_url.scheme == "http" and not proxies and _lean_transport_wanted()
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
            self._client = _ConnectionPool(self._max_connections, self._client_options, lean=self._lean)
            self._model_lock = asyncio.Lock()
            self._loop = loop
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()

    # --- public calls ---------------------------------------------------------

    async def _generate(
        self, messages: Sequence[Message], n: int, params: GenerationParams, listeners: Listeners
    ) -> list[Completion]:
        model = self.model or await self._discover_model()
        request = _ChatRequest(messages, _fields(model, params))
        return await self._sample(request, params.seed, n, listeners)

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams, on_delta: DeltaCallback
    ) -> Completion:
        """The completion, its deltas passed to ``on_delta`` as they arrive.

        Deltas already delivered cannot be taken back, so a stream that breaks
        after its first delta is not retried: it comes back as a failed
        completion holding the partial text.
        """
        model = self.model or await self._discover_model()
        request = _ChatRequest(messages, _fields(model, params))
        (completion,) = await self._call(request, 1, params.seed, on_delta=on_delta)
        return completion

    # --- sampling ---------------------------------------------------------------

    async def _sample(self, request: _ChatRequest, seed: int | None, n: int, listeners: Listeners) -> list[Completion]:
        """``n`` samples; when they are split over calls, sample ``i`` is seeded ``seed + i``."""
        if n == 1 or self.max_n == 1:
            return await self._singles(request, seed, n, listeners)
        asked = min(n, self.max_n)
        try:
            completions = await self._call(request, asked, seed, listeners)
        except BackendError as exc:
            if exc.kind != "bad_request" or self.n_mode != "auto" or self._n_confirmed:
                raise
            # Maybe the server refuses ``n`` itself: a single-sample call tells
            # (and raises the server's real complaint if it was something else).
            completions = await self._call(request, 1, seed, listeners)
            self._learn_max_n(1, f"it refused n={asked} ({exc})")
        else:
            if len(completions) < asked:
                self._learn_max_n(len(completions), f"it returned {len(completions)} of {asked} choices")
            elif self.n_mode == "auto":
                self._n_confirmed = True
        if len(completions) < n:
            done = len(completions)
            rest = await self._sample(request, offset_seed(seed, done), n - done, listeners.shifted(done))
            completions += rest
        return completions

    def _learn_max_n(self, returned: int, why: str) -> None:
        if self.n_mode == "auto" and returned < self.max_n:
            self.max_n = max(1, returned)
            logger.info("backend %s: asking for at most n=%d, since %s", self.display_url, self.max_n, why)

    async def _singles(self, request: _ChatRequest, seed: int | None, n: int, listeners: Listeners) -> list[Completion]:
        """``n`` parallel single-sample calls; failed calls become failed samples."""
        if n == 1:
            return await self._call(request, 1, seed, listeners)
        outcomes = await asyncio.gather(
            *(self._call(request, 1, offset_seed(seed, i), listeners.shifted(i)) for i in range(n)),
            return_exceptions=True,
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

    async def _call(
        self,
        request: _ChatRequest,
        n: int,
        seed: int | None,
        listeners: Listeners | None = None,
        on_delta: DeltaCallback | None = None,
    ) -> list[Completion]:
        """One call of ``n`` samples, streamed, with its retries.

        Besides the retry policy: a server that refuses ``stream`` (HTTP 400
        on a plain request that works) is called without it from then on,
        and a context overflow is retried once with a ``max_tokens`` that fits.
        """
        started = time.perf_counter()
        failures: list[str] = []
        refit = False
        plain = False  # this call goes on without streaming
        probing_refusal = False
        if self._refuses_logprobs:
            request = request.without_logprobs()
        _count_call()
        attempt = 0
        while True:
            attempt += 1
            stream = self._streams is not False and not plain
            state = _StreamState(n, on_delta, listeners or _NO_LISTENERS, request.fields.get("logprobs") is True)
            try:
                completions = await self._exchange(request.payload(n, seed, stream), state)
            except httpx.RequestError as exc:
                error = self._transport_error(exc)
            except BackendError as exc:
                error = exc
            else:
                if probing_refusal:
                    self._streams = False
                    logger.info("backend %s refuses stream=true; calling it without streaming", self.display_url)
                elif state.streamed:
                    self._streams = True
                if not any(completion.prompt_tokens for completion in completions):
                    # No usage (llama-cpp-python does not send it in streams):
                    # estimate the prompt rather than count it as free.
                    completions[0].prompt_tokens = -(-len(request.messages_json) // 4)
                latency_s = time.perf_counter() - started
                for completion in completions:
                    completion.latency_s = latency_s
                    completion.failed_attempts = tuple(failures)
                return completions
            if error.kind == "bad_request" and "logprobs" in request.fields and "logprob" in str(error).lower():
                # A model that gives no logprobs (OpenAI's reasoning models say so with a 400):
                # go on without, as with a server that ignores them; confidence stays unset.
                logger.warning("backend %s refuses logprobs (%s); calling it without them", self.display_url, error)
                self._refuses_logprobs = True
                request = request.without_logprobs()
                attempt -= 1
                continue
            if isinstance(error, ContextOverflowError) and not refit:
                refit = True
                request = self._fit(request, error)
                attempt -= 1  # not a failure of the server: the retry policy does not count it
                continue
            if error.kind == "bad_request" and stream and self._streams is None:
                plain = probing_refusal = True  # maybe the server cannot stream: a plain call tells
                attempt -= 1
                continue
            if error.kind == "protocol" and state.streamed and state.events == 0 and not plain:
                # An event stream that ended before its first event: some servers
                # (llama-cpp-python) fail so where a plain call gives the real error.
                plain = True
                attempt -= 1
                continue
            if on_delta is not None and state.delivered:
                partial = state.partial(error, time.perf_counter() - started)
                partial.failed_attempts = tuple(failures)
                return [partial]
            await self._before_retry(error, attempt, failures)

    def _fit(self, request: _ChatRequest, overflow: ContextOverflowError) -> _ChatRequest:
        """``request`` with a ``max_tokens`` that fits the context, as the server's error tells.

        Without figures in the error, ``max_tokens`` is dropped (the server
        then generates to the end of its context, as the reference release
        does). Raises ``overflow`` when the prompt alone does not fit.
        """
        context, prompt = overflow.context_tokens, overflow.prompt_tokens
        if context is not None and prompt is not None:
            room = context - prompt - CONTEXT_MARGIN_TOKENS
            if room < 1:
                raise ContextOverflowError(
                    f"the prompt ({prompt:,} tokens) does not fit the context of backend "
                    f"{self.display_url} ({context:,} tokens)",
                    context_tokens=context,
                    prompt_tokens=prompt,
                )
            logger.info("backend %s: context overflow; retrying with max_tokens=%d", self.display_url, room)
            return request.with_max_tokens(room)
        if "max_tokens" not in request.fields and "max_completion_tokens" not in request.fields:
            raise overflow  # nothing left to lower: the prompt itself is too long
        logger.info("backend %s: context overflow; retrying without max_tokens", self.display_url)
        return request.with_max_tokens(None)

    def _parse_chat(self, data: Any, asked: int, logprobs: bool = False) -> list[Completion]:
        """The choices of a (non-streamed) chat completion, with its usage attributed per choice."""
        try:
            choices = data["choices"]
            if len(choices) > 1:
                choices = sorted(choices, key=lambda choice: choice.get("index", 0))[:asked]
            completions = [_choice_completion(choice, logprobs) for choice in choices]
            if not completions:
                raise ValueError("no choices")
            usage = data.get("usage")
            if not usage:
                # Accept the answer; estimate what it cost rather than count it as free.
                for completion in completions:
                    completion.completion_tokens = _estimated_tokens(completion)
                return completions
            _attribute_usage(completions, usage)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            detail = _error_detail(data)
            raise BackendError(
                f"backend {self.display_url} answered with no valid chat completion"
                + (f": {self._redact(detail)}" if detail else ""),
                kind="protocol",
            ) from None
        return completions

    async def _discover_model(self) -> str:
        self._http()  # the lock below belongs to the running loop
        async with self._model_lock:
            if not self.model:
                try:
                    ids = await self._get_json(self._models_url, _model_ids)
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

    async def _get_json(self, url: httpx.URL, check: Callable[[Any], T]) -> T:
        """A GET whose JSON answer ``check`` validates, with retries."""
        _count_call()
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._http().stream("GET", url, content=None) as response:
                    body = await self._read(response)
                    if not 200 <= response.status_code < 300:
                        raise self._status_error(response, body)
                return check(self._json(body, response.status_code))
            except httpx.RequestError as exc:
                error = self._transport_error(exc)
            except BackendError as exc:
                error = exc
            await self._before_retry(error, attempt, None)

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
            limit = f" for {self._read_timeout:g}s" if self._read_timeout else ""
            return BackendError(f"{where} sent nothing{limit}", kind="timeout")
        if isinstance(exc, httpx.ConnectError):
            return BackendError(f"{where} is unreachable ({_reason(exc)})", kind="connect")
        if isinstance(exc, httpx.TransportError):
            return BackendError(f"connection to {where} failed ({_reason(exc)})", kind="connect")
        # Not the connection's fault: an undecodable body, a redirect loop...
        return BackendError(f"{where} sent an unusable answer ({_reason(exc)})", kind="protocol")

    def _status_error(self, response: httpx.Response, body: bytes) -> BackendError:
        status = response.status_code
        parsed = _json_or_text(body)
        detail = self._redact(_error_detail(parsed))
        suffix = f": {detail}" if detail else ""
        if status in (401, 403):
            if self._api_key:
                message = f"backend rejected the API key (HTTP {status}){suffix}"
            else:
                message = f"backend requires an API key (HTTP {status}); set PACORE_API_KEY or pass --api-key{suffix}"
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
        overflow = self._overflow(parsed, f" (HTTP {status}){suffix}")
        if overflow is not None:
            return overflow
        return BackendError(
            f"backend rejected the request (HTTP {status}){suffix}", kind="bad_request", status_code=status
        )

    def _overflow(self, body: Any, suffix: str) -> ContextOverflowError | None:
        """The error for ``body`` if it says the request overflows the context, else ``None``."""
        figures = context_overflow(body)
        if figures is None:
            return None
        context, prompt = figures
        return ContextOverflowError(
            f"the prompt and max_tokens exceed the context of backend {self.display_url}{suffix}",
            context_tokens=context,
            prompt_tokens=prompt,
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key and text else text

    # --- reading answers --------------------------------------------------------------

    async def _exchange(self, payload: bytes, state: _StreamState) -> list[Completion]:
        """Send one chat call and read its answer: a stream of events, or plain JSON."""
        try:
            async with self._http().stream("POST", self._chat_url, content=payload) as response:
                if not 200 <= response.status_code < 300:
                    raise self._status_error(response, await self._read(response))
                if "event-stream" not in response.headers.get("content-type", ""):
                    # The server ignored ``stream`` (or was not asked): one JSON completion.
                    completions = self._parse_chat(
                        self._json(await self._read(response), response.status_code), state.asked, state.logprobs
                    )
                    state.deliver_whole(completions)
                    return completions
                await self._read_events(response, state)
                # Inside the block: a stream that ended short leaves its connection
                # discarded, since a server that cut it may well close it next.
                return state.completions(self)
        except httpx.TransportError:
            if not state.done:
                raise
            # The server sent [DONE] but did not end the body cleanly: the answer
            # is whole (and the pool has discarded the connection).
        return state.completions(self)

    async def _read_events(self, response: httpx.Response, state: _StreamState) -> None:
        """Feed ``state`` the ``data`` fields of a server-sent event stream, up to ``max_reply_bytes``.

        Lines are split here, on bytes, so a line without end cannot grow
        past the cap unnoticed. After ``[DONE]`` the body is read to its end,
        so the connection can be reused. This runs for every token of every
        call: it is written for speed. Servers send each event as its own
        HTTP chunk, so an uncompressed body (the usual case) is read from the
        response's raw stream, since ``aiter_bytes`` adds two generator layers
        (content decoding, re-chunking) per event, and a chunk holding exactly
        one event skips the line splitting.
        """
        state.streamed = True
        limit = self.max_reply_bytes
        feed = state.feed
        received = 0
        pending: list[bytes] = []
        raw = response.stream
        encoded = response.headers.get("content-encoding", "identity").lower() not in ("identity", "")
        chunks = response.aiter_bytes() if encoded or not isinstance(raw, httpx.AsyncByteStream) else raw
        try:
            async for chunk in chunks:
                received += len(chunk)
                if received > limit:
                    raise self._too_large()
                if state.done:
                    continue
                end = chunk.find(b"\n")
                if end == len(chunk) - 2 and not pending and chunk[-1] == 10:
                    lines = [chunk[:end]]  # the usual chunk: one whole event
                elif end < 0:
                    pending.append(chunk)
                    continue
                else:
                    if pending:
                        pending.append(chunk)
                        chunk = b"".join(pending)
                        pending = []
                    lines = chunk.split(b"\n")
                    rest = lines.pop()
                    if rest:
                        pending.append(rest)
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, ": ping" comments, event names
                    data = line[5:].strip()
                    if not data:
                        continue
                    state.events += 1
                    if data == b"[DONE]":
                        state.done = True
                        break
                    try:
                        feed(_event_json(data))
                    except (ValueError, TypeError, AttributeError, KeyError) as exc:
                        raise BackendError(
                            f"backend {self.display_url} sent a malformed stream chunk ({exc})", kind="protocol"
                        ) from None
                    if state.error is not None:
                        raise self._stream_error(state.error)
        except httpx.TimeoutException:
            raise
        except httpx.TransportError as exc:
            if state.done:
                raise
            raise self._truncated(f"the connection broke: {_reason(exc)}") from None

    def _stream_error(self, chunk: Any) -> BackendError:
        """The error a server reported in a stream chunk."""
        detail = self._redact(_error_detail(chunk))
        return self._overflow(chunk, f" (mid-stream): {detail}") or BackendError(
            f"backend {self.display_url} reported an error mid-stream: {detail}", kind="status"
        )

    async def _read(self, response: httpx.Response) -> bytes:
        """The whole body of ``response``, refused once it exceeds ``max_reply_bytes``."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_reply_bytes:
            raise self._too_large()
        parts: list[bytes] = []
        received = 0
        async for chunk in response.aiter_bytes():
            received += len(chunk)
            if received > self.max_reply_bytes:
                raise self._too_large()
            parts.append(chunk)
        return b"".join(parts)

    def _json(self, body: bytes, status: int) -> Any:
        try:
            return json.loads(body)
        except ValueError:
            raise BackendError(
                f"backend {self.display_url} returned malformed JSON (HTTP {status})", kind="protocol"
            ) from None

    def _too_large(self) -> BackendError:
        return BackendError(
            f"backend {self.display_url} sent more than {self.max_reply_bytes:,} bytes for one call; "
            "refused (max_reply_bytes)",
            kind="too_large",
        )

    def _truncated(self, why: str) -> BackendError:
        return BackendError(
            f"backend {self.display_url} ended the stream before the completion finished ({why})",
            kind="protocol",
        )


#: ``httpx`` keeps httpx's own transport for every backend: the lean one is a speed-up, and a
#: user who meets a server it does not handle gets the well-trodden path back without a release.
TRANSPORT_ENV = "PACORE_HTTP_TRANSPORT"


def _lean_transport_wanted() -> bool:
    choice = os.environ.get(TRANSPORT_ENV, "").strip().lower() or "lean"
    if choice not in ("lean", "httpx"):
        raise UsageError(f"{TRANSPORT_ENV} must be 'lean' or 'httpx', got {choice!r}")
    return choice == "lean"


class _ConnectionPool:
    """Keep-alive connections on a free list, each its own one-connection ``httpx.AsyncClient``.

    httpcore's pool rescans every connection it holds, and every queued
    request, on each request: with a round's hundreds of calls in flight in
    one client that costs milliseconds of CPU per call, several times the
    call itself (``bench/orchestration.py``). Here a call takes an idle
    connection in constant time; calls beyond ``size`` wait on a semaphore.

    With the lean transport each connection is a bare :class:`LeanTransport`,
    sent requests built as an ``httpx.AsyncClient`` would build them (its
    default headers and timeouts, worked out once): the client's layers
    around the transport (auth, redirects, cookie jar, event hooks) serve no
    purpose for an API call and cost about a tenth of a pass-through
    request's CPU in ``pacore serve`` (``bench/proxy.py``).
    """

    def __init__(self, size: int, options: dict[str, Any], lean: bool = False) -> None:
        self._lean = lean
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        # One TLS context for all: building one per client costs milliseconds (the lean transport needs none).
        self._options = {**({} if lean else {"verify": httpx.create_ssl_context()}), **options, "limits": one}
        self._gate = asyncio.Semaphore(size)
        self._idle: list[httpx.AsyncClient | LeanTransport] = []
        self._clients: list[httpx.AsyncClient | LeanTransport] = []
        self._closing: set[asyncio.Task[None]] = set()
        if lean:
            # httpx's own merge of its default headers and timeouts with ours, read off a client that sends
            # nothing and is closed here (a synchronous one: ``__init__`` cannot await an AsyncClient's close).
            with httpx.Client(
                headers=options["headers"], timeout=options["timeout"], transport=httpx.BaseTransport()
            ) as template:
                self._headers = template.headers
                self._timeouts = template.timeout.as_dict()

    @contextlib.asynccontextmanager
    async def _lease(self) -> AsyncIterator[httpx.AsyncClient | LeanTransport]:
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

    def _discard(self, client: httpx.AsyncClient | LeanTransport) -> None:
        """Close ``client`` for good; a second discard of it (a second Ctrl+C...) does nothing."""
        if client not in self._clients:
            return
        self._clients.remove(client)
        closing = asyncio.get_running_loop().create_task(client.aclose())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    def _open(self) -> httpx.AsyncClient | LeanTransport:
        client = LeanTransport() if self._lean else httpx.AsyncClient(**self._options)
        self._clients.append(client)
        return client

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: httpx.URL, *, content: bytes | None) -> AsyncIterator[httpx.Response]:
        async with self._lease() as client:
            if isinstance(client, httpx.AsyncClient):
                async with client.stream(method, url, content=content) as response:
                    yield response
                return
            request = httpx.Request(method, url, headers=self._headers, content=content)
            request.extensions["timeout"] = self._timeouts
            response = await client.handle_async_request(request)
            response.request = request
            try:
                yield response
            finally:
                await response.aclose()

    async def aclose(self) -> None:
        clients, self._clients, self._idle = self._clients, [], []
        await asyncio.gather(*(client.aclose() for client in clients), *self._closing)


class _ChatRequest:
    """A chat request whose messages are serialized once for all of its calls."""

    __slots__ = ("messages_json", "fields")

    def __init__(self, messages: Sequence[Message] | bytes, fields: dict[str, Any]) -> None:
        self.messages_json = messages if isinstance(messages, bytes) else _dumps(list(messages))
        self.fields = fields

    def payload(self, n: int, seed: int | None, stream: bool) -> bytes:
        fields = self.fields
        if n > 1 or seed is not None or stream:
            fields = dict(fields)
            if n > 1:
                fields["n"] = n
            if seed is not None:
                fields["seed"] = seed
            if stream:
                fields["stream"] = True
                fields["stream_options"] = {"include_usage": True}
        # ``fields`` always holds the model, so its JSON object is never empty.
        return b'{"messages":' + self.messages_json + b"," + _dumps(fields)[1:]

    def without_logprobs(self) -> _ChatRequest:
        """The same request asking for no logprobs."""
        fields = {key: value for key, value in self.fields.items() if key not in ("logprobs", "top_logprobs")}
        return _ChatRequest(self.messages_json, fields)

    def with_max_tokens(self, max_tokens: int | None) -> _ChatRequest:
        """The same request with ``max_tokens`` replaced (``None``: left to the server)."""
        fields = {key: value for key, value in self.fields.items() if key not in _MAX_TOKENS_FIELDS}
        if max_tokens is not None:
            fields["max_tokens"] = max_tokens
        return _ChatRequest(self.messages_json, fields)


_MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")


def _fields(model: str, params: GenerationParams) -> dict[str, Any]:
    fields: dict[str, Any] = {"model": model, "temperature": params.temperature, "top_p": params.top_p}
    if params.max_tokens is not None:
        fields["max_tokens"] = params.max_tokens
    if params.stop:
        fields["stop"] = list(params.stop)
    if params.top_logprobs is not None:
        fields["logprobs"] = True
        fields["top_logprobs"] = params.top_logprobs
    fields.update(params.extra)
    return fields


#: ``json.loads`` without its per-call checks: (value, end) of the JSON text at the start of a str.
_decode_json = json.JSONDecoder().raw_decode


def _event_json(data: bytes) -> Any:
    """An SSE event's JSON: pydantic's parser (about 3x faster on a chunk), else the standard library's,
    which also takes what pydantic refuses and servers do send (lone surrogate escapes, trailing bytes)."""
    try:
        return from_json(data)
    except ValueError:
        return _decode_json(data.decode())[0]


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


_NO_LISTENERS = Listeners()


def _token_confidences(logprobs: Any) -> list[float]:
    """DeepConf token confidences of a choice's ``logprobs`` (OpenAI chat format), in order.

    Each ``logprobs.content[j].top_logprobs`` gives one token's alternatives; a
    token without them, or anything not in that shape, is skipped rather than
    failing a completion over a diagnostic.
    """
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return []
    confidences = []
    for token in content:
        top = token.get("top_logprobs") if isinstance(token, dict) else None
        if not isinstance(top, list):
            continue
        values = [
            alternative["logprob"]
            for alternative in top
            if isinstance(alternative, dict) and isinstance(alternative.get("logprob"), (int, float))
        ]
        if values:
            confidences.append(token_confidence(values))
    return confidences


class _Choice:
    """What a stream has delivered of one choice."""

    __slots__ = ("text", "reasoning", "finish_reason", "chunks", "confidences")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.finish_reason: str | None = None
        #: Chunks that carried text: servers send about one token each.
        self.chunks = 0
        #: Token confidences, once a chunk carried logprobs.
        self.confidences: list[float] | None = None


class _StreamState:
    """What one attempt of a call has received so far, choice by choice (by ``index``)."""

    __slots__ = (
        "asked", "choices", "usage", "error", "done", "streamed", "events", "on_delta", "on_progress", "on_confidence",
        "logprobs",
    )  # fmt: skip

    def __init__(self, asked: int, on_delta: DeltaCallback | None, listeners: Listeners, logprobs: bool) -> None:
        self.asked = asked
        self.choices: dict[int, _Choice] = {}
        self.usage: Any = None
        #: The chunk that reported an error, if one did.
        self.error: Any = None
        #: ``[DONE]`` was received.
        self.done = False
        #: The answer came as a stream of events (not plain JSON).
        self.streamed = False
        #: ``data`` fields received.
        self.events = 0
        self.on_delta = on_delta
        self.on_progress = listeners.on_progress
        self.on_confidence = listeners.on_confidence
        #: Logprobs were asked for: only then are they read (a server may send them unasked).
        self.logprobs = logprobs

    def feed(self, chunk: dict[str, Any]) -> None:
        """Take one chunk; deltas go to ``on_delta`` (choice 0), ``on_progress`` and ``on_confidence``."""
        if "error" in chunk and chunk["error"]:
            self.error = chunk
            return
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        for choice in chunk.get("choices") or ():
            index = choice.get("index") or 0
            state = self.choices.get(index)
            if state is None:
                if not isinstance(index, int) or not 0 <= index < self.asked:
                    continue  # a choice nobody asked for
                state = self.choices[index] = _Choice()
            delta = choice.get("delta")
            if delta:
                content = _text_or_none(delta.get("content"), "content")
                reasoning = _text_or_none(delta.get("reasoning_content") or delta.get("reasoning"), "reasoning")
                if content or reasoning:
                    state.chunks += 1
                    if content:
                        state.text.append(content)
                    if reasoning:
                        state.reasoning.append(reasoning)
                    if self.on_delta is not None and index == 0:
                        self.on_delta(content or "", reasoning or "")
                    if self.on_progress is not None:
                        self.on_progress(index, state.chunks)
            logprobs = choice.get("logprobs") if self.logprobs else None
            if logprobs:
                # Every generated token counts, reasoning included (DeepConf scores them all).
                self.add_confidences(index, state, _token_confidences(logprobs))
            finish = _text_or_none(choice.get("finish_reason"), "finish_reason")
            if finish:
                state.finish_reason = finish

    def add_confidences(self, index: int, choice: _Choice, confidences: list[float]) -> None:
        if choice.confidences is None:
            choice.confidences = []
        if confidences:
            choice.confidences += confidences
            if self.on_confidence is not None:
                self.on_confidence(index, confidences)

    @property
    def delivered(self) -> bool:
        """Whether ``on_delta`` has been given anything."""
        first = self.choices.get(0)
        return self.on_delta is not None and first is not None and first.chunks > 0

    def deliver_whole(self, completions: list[Completion]) -> None:
        """Pass a non-streamed answer to ``on_delta`` as one delta, and its confidences to ``on_confidence``."""
        if self.on_delta is not None and (completions[0].text or completions[0].reasoning):
            self.on_delta(completions[0].text, completions[0].reasoning or "")
        if self.on_confidence is not None:
            for index, completion in enumerate(completions):
                if completion.token_confidences:
                    self.on_confidence(index, completion.token_confidences)

    def completions(self, backend: OpenAIBackend) -> list[Completion]:
        """The finished choices in index order, with the usage attributed per choice."""
        if not self.choices:
            raise backend._truncated("no choices")
        ordered = [self.choices[index] for index in sorted(self.choices)]
        if any(choice.finish_reason is None for choice in ordered):
            raise backend._truncated("no finish reason")
        completions = [
            Completion(
                text="".join(c.text),
                reasoning="".join(c.reasoning) or None,
                finish_reason=c.finish_reason,
                token_confidences=c.confidences,
            )
            for c in ordered
        ]
        try:
            if self.usage:
                _attribute_usage(completions, self.usage)
                return completions
        except (TypeError, ValueError, AttributeError):
            pass  # unusable usage: count chunks as below
        # Without a usage chunk (the server ignored include_usage), each
        # choice's text chunks approximate its tokens.
        for completion, choice in zip(completions, ordered, strict=True):
            completion.completion_tokens = choice.chunks
        return completions

    def partial(self, error: BackendError, latency_s: float) -> Completion:
        """A failed completion keeping what choice 0 streamed before ``error``."""
        choice = self.choices[0]
        return Completion(
            text="".join(choice.text),
            reasoning="".join(choice.reasoning) or None,
            completion_tokens=choice.chunks,
            latency_s=latency_s,
            token_confidences=choice.confidences,
            error=f"{error} (after {choice.chunks} streamed chunks; the partial text is kept)",
            error_kind=error.kind,
        )


def _attribute_usage(completions: list[Completion], usage: dict[str, Any]) -> None:
    """One call's usage per choice: prompt tokens to the first, completion tokens by text length."""
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion_tokens = int(usage.get("completion_tokens") or 0)
    for completion in completions:
        completion.prompt_tokens = 0
    completions[0].prompt_tokens = prompt_tokens
    if len(completions) == 1:
        completions[0].completion_tokens = completion_tokens
        return
    weights = [len(c.text) + len(c.reasoning or "") for c in completions]
    for completion, share in zip(completions, _proportional(completion_tokens, weights), strict=True):
        completion.completion_tokens = share


# --- context overflow -------------------------------------------------------------
# What each server says when prompt + max_tokens exceed the context, e.g.
#   vLLM:    "This model's maximum context length is 4096 tokens. However, you requested
#             5000 tokens (1000 in the messages, 4000 in the completion). ..."
#            "'max_tokens' or 'max_completion_tokens' is too large: 4000. This model's maximum
#             context length is 4096 tokens and your request has 1000 input tokens (...)"
#            "... However, you requested 4000 output tokens and your prompt contains at least
#             1000 input tokens, for a total of at least 5000 tokens. ..."
#   SGLang:  "Requested token count exceeds the model's maximum context length of 4096 tokens.
#             You requested a total of 5000 tokens: 1000 tokens from the input messages and
#             4000 tokens for the completion. ..."
#            "The input (5000 tokens) is longer than the model's context length (4096 tokens)."
#   llama.cpp: "request (5000 tokens) exceeds the available context size (4096 tokens), try
#             increasing it" (older: "the request exceeds the available context size, try
#             increasing it"), with ``n_prompt_tokens`` and ``n_ctx`` in the error object.
#   llama-cpp-python: "Requested tokens (5000) exceed context window of 4096", which its
#             server rewrites into vLLM's first form (code ``context_length_exceeded``).

_OVERFLOW_SIGNS = re.compile(
    r"maximum context length|context length \(|exceed(?:s)? (?:the available )?context (?:size|window)"
    r"|maximum model length|context_length_exceeded|exceed_context_size",
    re.IGNORECASE,
)
_NUMBER = r"(\d[\d,]*)(?:\.\d+)?"


def _any_case(*patterns: str) -> list[re.Pattern[str]]:
    return [re.compile(pattern, re.IGNORECASE) for pattern in patterns]


#: Where a message gives the context size: the first pattern that matches captures it.
_CONTEXT_FIGURES = _any_case(
    rf"maximum context length (?:is|of) {_NUMBER}",
    rf"context length \({_NUMBER} tokens\)",
    rf"maximum model length (?:is |of )?{_NUMBER}",
    rf"available context size \({_NUMBER} tokens\)",
    rf"context window of {_NUMBER}",
)
#: Where it gives the prompt's size, likewise.
_PROMPT_FIGURES = _any_case(
    rf"{_NUMBER} (?:tokens )?in the messages",
    rf"{_NUMBER} tokens from the input messages",
    rf"(?:has|contains)(?: at least)? {_NUMBER} input tokens",
    rf"the input \({_NUMBER} tokens\)",
    rf"request \({_NUMBER} tokens\)",
    rf"prompt \(length {_NUMBER}\)",
    rf"requested tokens \({_NUMBER}\)",
)


def context_overflow(body: Any) -> tuple[int | None, int | None] | None:
    """``(context_tokens, prompt_tokens)`` if an error ``body`` says the context overflowed, else ``None``.

    Either figure is ``None`` when the message does not give it. ``body`` is
    the parsed JSON error (or its text).
    """
    error = body.get("error") if isinstance(body, dict) else None
    fields = error if isinstance(error, dict) else {}
    message = _error_detail(body) + " " + str(fields.get("type") or "") + " " + str(fields.get("code") or "")
    if not _OVERFLOW_SIGNS.search(message):
        return None
    context = _integer(fields.get("n_ctx")) or _first_figure(_CONTEXT_FIGURES, message)
    prompt = _integer(fields.get("n_prompt_tokens")) or _first_figure(_PROMPT_FIGURES, message)
    return context, prompt


def _first_figure(patterns: list[re.Pattern[str]], message: str) -> int | None:
    for pattern in patterns:
        match = pattern.search(message)
        if match:
            return int(match.group(1).replace(",", ""))
    return None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _text_or_none(value: Any, field: str) -> str | None:
    """A chunk's text field; any other type is a malformed chunk (raised here, inside the chunk's parsing)."""
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{field} is a {type(value).__name__}, not a string")


def _choice_completion(choice: dict[str, Any], logprobs_asked: bool) -> Completion:
    """One choice of a non-streamed chat completion."""
    message = choice["message"]
    logprobs = choice.get("logprobs") if logprobs_asked else None
    return Completion(
        text=message.get("content") or "",
        reasoning=message.get("reasoning_content") or message.get("reasoning") or None,
        finish_reason=choice.get("finish_reason"),
        token_confidences=_token_confidences(logprobs) if logprobs else None,
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


def _json_or_text(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")


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
