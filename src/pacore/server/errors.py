"""The one place where errors become HTTP statuses and OpenAI error JSON.

Every error the server answers with, whether raised by the engine, by the
request checks, by FastAPI's validation or by routing (404/405), goes
through :func:`describe`, so every client SDK raises the right exception
(``openai.BadRequestError`` for 400, ``AuthenticationError`` for 401...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from pacore.errors import (
    BackendError,
    DeadlineExceededError,
    PacoreError,
    RoundFailedError,
    TemplateError,
    UsageError,
    shorten,
)
from pacore.server.protocol import ErrorInfo, ErrorResponse

#: The status logged and counted for a client that went away mid-request (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
#: Longest validation message and parameter path sent back (they may quote the client's input).
_MESSAGE_CHARS = 200
_PARAM_CHARS = 80


class InvalidRequestError(UsageError):
    """A request the server refuses as given; ``param`` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class AuthenticationError(PacoreError):
    """No API key, or one this server does not know."""


class PayloadTooLargeError(PacoreError):
    """The request body is larger than the server accepts."""


class RequestTimeoutError(PacoreError):
    """The client took too long to send its request (headers or body)."""


class HeadersTooLargeError(PacoreError):
    """The request line and headers exceeded the server's limit."""


class InternalError(PacoreError):
    """A bug: an exception nobody raised on purpose (its traceback is logged, not sent)."""


class UnsupportedMediaTypeError(PacoreError):
    """The request body is declared as something other than JSON."""


class OverloadedError(PacoreError):
    """Too many requests are running; ``retry_after`` is in seconds."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(PacoreError):
    """The server is stopping: it takes no new request, or ended a running one."""


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    body: ErrorResponse
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> str:
        """The error as a server-sent event, for failures after a stream has started."""
        return f"data: {self.body.model_dump_json()}\n\n"


# Backend failures are the upstream's fault (502), except a refusal of the
# request itself (400: e.g. a prompt longer than the model's context) and a
# timeout (504).
_BACKEND_STATUS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "invalid_request_error"),
    "timeout": (504, "api_error"),
    "model": (500, "api_error"),
}


def describe(exc: BaseException) -> ErrorReply:
    """The status, OpenAI error body and headers for ``exc``."""
    if isinstance(exc, HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        if exc.status_code >= 500:
            kind = "api_error"
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route; the API lives under /v1 (see /v1/models)"
        return _reply(exc.status_code, message, kind, headers=dict(exc.headers or {}))
    if isinstance(exc, (RequestValidationError, ValidationError)):
        message, param = _validation_message(exc)
        return _reply(400, message, "invalid_request_error", param=param, code="invalid_value")
    if isinstance(exc, AuthenticationError):
        return _reply(
            401, str(exc), "authentication_error", code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
    if isinstance(exc, PayloadTooLargeError):
        return _reply(413, str(exc), "invalid_request_error", code="request_too_large")
    if isinstance(exc, RequestTimeoutError):
        return _reply(408, str(exc), "invalid_request_error", code="request_timeout", headers={"Connection": "close"})
    if isinstance(exc, HeadersTooLargeError):
        return _reply(431, str(exc), "invalid_request_error", code="headers_too_large", headers={"Connection": "close"})
    if isinstance(exc, UnsupportedMediaTypeError):
        return _reply(415, str(exc), "invalid_request_error", code="unsupported_media_type")
    if isinstance(exc, ShuttingDownError):
        return _reply(503, str(exc), "api_error", code="server_shutting_down", headers={"Connection": "close"})
    if isinstance(exc, OverloadedError):
        return _reply(
            429, str(exc), "rate_limit_error", code="too_many_concurrent_requests",
            headers={"Retry-After": str(exc.retry_after)},
        )  # fmt: skip
    if isinstance(exc, TemplateError):
        # The synthesis template is the server's own configuration, not the client's doing.
        return _reply(500, f"the server's synthesis template failed: {exc}", "api_error", code="template_error")
    if isinstance(exc, InvalidRequestError):
        return _reply(400, str(exc), "invalid_request_error", param=exc.param, code=exc.code)
    if isinstance(exc, UsageError):
        return _reply(400, str(exc), "invalid_request_error")
    if isinstance(exc, BackendError):
        status, kind = _BACKEND_STATUS.get(exc.kind, (502, "api_error"))
        return _reply(status, str(exc), kind, code=f"backend_{exc.kind}")
    if isinstance(exc, DeadlineExceededError):
        return _reply(504, str(exc), "api_error", code="deadline_exceeded")
    if isinstance(exc, RoundFailedError):
        if _timed_out(exc):
            return _reply(504, str(exc), "api_error", code="backend_timeout")
        return _reply(502, str(exc), "api_error", code="round_failed")
    if isinstance(exc, PacoreError):
        return _reply(500, str(exc), "api_error")
    return _reply(500, "internal server error; see the server log", "api_error")


def _timed_out(exc: RoundFailedError) -> bool:
    """Whether the round that failed did so because every one of its calls timed out."""
    rounds = exc.result.rounds if exc.result is not None else []
    failed = [t for t in rounds[-1].trajectories if not t.ok] if rounds else []
    return (
        bool(failed) and len(failed) == len(rounds[-1].trajectories) and all(t.error_kind == "timeout" for t in failed)
    )


def _reply(
    status: int,
    message: str,
    kind: str,  # the error object's "type" (invalid_request_error...)
    param: str | None = None,  # the request field at fault
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> ErrorReply:
    info = ErrorInfo(message=message, type=kind, param=param, code=code)
    return ErrorReply(status, ErrorResponse(error=info), headers or {})


def _validation_message(exc: RequestValidationError | ValidationError) -> tuple[str, str | None]:
    """``(message, param)`` naming the first invalid field, as OpenAI does."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    # FastAPI prefixes where the value came from ("body", "query"); OpenAI names the field only.
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(loc) or None
    # Some messages quote the input (a discriminator's tag, say): never at length.
    message = shorten(str(first.get("msg", "invalid value")).removeprefix("Value error, "), _MESSAGE_CHARS)
    param = shorten(param, _PARAM_CHARS) if param else None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception FastAPI sees through :func:`describe`."""

    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        return describe(exc).response()

    # Exception last: Starlette answers with it, then re-raises so the server logs the traceback.
    for kind in (HTTPException, RequestValidationError, ValidationError, PacoreError, Exception):
        app.add_exception_handler(kind, handle)
