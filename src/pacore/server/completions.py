"""Chat completion requests in, engine arguments out; results and events back to OpenAI shapes.

Pure translation: nothing here runs the engine or touches HTTP. The
schedule of a request comes from, in order, the body's ``pacore.schedule``,
a model name ``pacore-<preset or counts>/<model>``, the server default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import pydantic_core

from pacore.backends.base import GenerationParams, Message
from pacore.cli.progress import ProgressState, round_line
from pacore.engine import normalize_messages
from pacore.errors import ScheduleError
from pacore.schedule import Schedule
from pacore.server.errors import InvalidRequestError, UnsupportedMediaTypeError
from pacore.server.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    CompletionUsage,
    DeltaMessage,
    FinishReason,
    PacoreSummary,
    StreamChoice,
)
from pacore.synthesis import ReferenceOrder
from pacore.trace import AnswerDelta, Event, Result, RoundFinished, RoundStarted, TrajectoryFinished

# "pacore-high/qwen3-8b", "pacore-16/qwen3-8b", "pacore-32,4/m", "pacore-off"
_PACORE_MODEL = re.compile(r"pacore-(?P<spec>[^/]*)(?:/(?P<model>.*))?", re.IGNORECASE | re.DOTALL)
#: In a model name, ``pacore-1`` means one call: the request passes straight through.
PASSTHROUGH_ALIAS = "1"

_FINISH_REASONS: frozenset[str] = frozenset({"stop", "length", "content_filter", "tool_calls"})


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request caps of a server."""

    max_rounds: int
    max_trajectories: int


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated request, ready for :func:`pacore.asolve`."""

    messages: list[Message]
    schedule: Schedule
    params: GenerationParams
    #: The model name as the client sent it; responses echo it.
    model: str
    stream: bool
    include_usage: bool
    #: ``None``: the server's default.
    reference_order: ReferenceOrder | None = None


def parse_body(body: bytes, content_type: str | None = None) -> ChatCompletionRequest:
    """The request body as a validated request.

    400 for bad UTF-8, bad JSON (lone surrogates, NaN and numbers too long to
    convert included), nesting deeper than the parser's limit or bad fields;
    415 when ``content_type`` says the body is not JSON (a missing one is
    taken as JSON, as curl users often forget it).
    """
    media_type = (content_type or "application/json").partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaTypeError(
            f"the request body must be JSON (Content-Type: application/json), not {media_type[:60]}"
        )
    try:
        # pydantic's Rust parser, not json.loads: it has a nesting limit instead of a
        # RecursionError, and refuses the lone surrogates json.loads lets through.
        data = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidRequestError(_json_problem(body, str(exc))) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    # A ValidationError is described by pacore.server.errors like FastAPI's own.
    return ChatCompletionRequest.model_validate(data)


def _json_problem(body: bytes, reason: str) -> str:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the request body is not valid UTF-8 (byte {exc.start})"
    if reason.startswith("recursion limit exceeded"):
        return f"the request body nests arrays or objects too deeply ({reason})"
    return f"the request body is not valid JSON: {reason}"


def plan_request(
    request: ChatCompletionRequest, *, default: Schedule, params: GenerationParams, limits: Limits
) -> Plan:
    _refuse_unsupported(request)
    schedule, param = resolve_schedule(request, default)
    check_limits(schedule, param, limits)
    messages = normalize_messages([m.model_dump(exclude_none=True) for m in request.messages])
    return Plan(
        messages=messages,
        schedule=schedule,
        params=request_params(request, params),
        model=request.model,
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        reference_order=request.pacore.reference_order if request.pacore else None,
    )


def resolve_schedule(request: ChatCompletionRequest, default: Schedule) -> tuple[Schedule, str | None]:
    """The request's schedule and the field it came from (``None``: server default)."""
    if request.pacore is not None and request.pacore.schedule is not None:
        return _parse_schedule(request.pacore.schedule, "pacore.schedule"), "pacore.schedule"
    match = _PACORE_MODEL.fullmatch(request.model.strip())
    if match:
        spec = match["spec"].strip()
        if spec == PASSTHROUGH_ALIAS:
            return Schedule(()), "model"
        return _parse_schedule(spec, "model"), "model"
    return default, None


def _parse_schedule(value: list[int] | int | str, param: str) -> Schedule:
    try:
        return Schedule.parse(value)
    except ScheduleError as exc:
        raise InvalidRequestError(str(exc), param=param, code="invalid_schedule") from None


def check_limits(schedule: Schedule, param: str | None, limits: Limits) -> None:
    """Refuse a schedule over the caps; ``param`` is the field it came from (``None``: the default)."""
    where = "" if param else " (the server's default schedule)"
    if len(schedule.rounds) > limits.max_rounds:
        raise InvalidRequestError(
            f"schedule {schedule}{where} has {len(schedule.rounds)} coordinated rounds; "
            f"this server allows at most {limits.max_rounds}",
            param=param,
            code="schedule_too_large",
        )
    if schedule.total_calls > limits.max_trajectories:
        raise InvalidRequestError(
            f"schedule {schedule}{where} runs {schedule.total_calls} trajectories "
            f"({' + '.join(map(str, schedule.ks))}); this server allows at most "
            f"{limits.max_trajectories} per request",
            param=param,
            code="schedule_too_large",
        )


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    if request.n is not None and request.n != 1:
        raise InvalidRequestError(
            f"n={request.n} is not supported: a PaCoRe request returns one synthesized answer "
            "(send several requests instead)",
            param="n",
        )
    if request.logprobs:
        raise InvalidRequestError("logprobs are not supported by pacore serve", param="logprobs")
    if request.tools or request.functions:
        raise InvalidRequestError(
            "tool calling is not supported by pacore serve", param="tools" if request.tools else "functions"
        )
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise InvalidRequestError(
            "only the text response_format is supported by pacore serve", param="response_format"
        )


def request_params(request: ChatCompletionRequest, defaults: GenerationParams) -> GenerationParams:
    """The server's defaults overridden by what the request sets."""
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    penalties = {
        name: value
        for name in ("presence_penalty", "frequency_penalty")
        if (value := getattr(request, name)) is not None
    }
    return replace(
        defaults,
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        max_tokens=request.max_completion_tokens or request.max_tokens or defaults.max_tokens,
        seed=defaults.seed if request.seed is None else request.seed,
        stop=tuple(stop) if stop else defaults.stop,
        extra={**defaults.extra, **penalties},
    )


def _finish_reason(result: Result) -> FinishReason:
    final = result.final
    reason = final.finish_reason if final else None
    return reason if reason in _FINISH_REASONS else "stop"  # type: ignore[return-value]


def _usage(result: Result) -> CompletionUsage:
    usage = result.usage
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def completion_of(result: Result, *, request_id: str, model: str, trace_url: str) -> ChatCompletion:
    final = result.final
    return ChatCompletion(
        id=request_id,
        model=model,
        choices=[
            Choice(
                message=AssistantMessage(content=result.answer, reasoning_content=final.reasoning if final else None),
                finish_reason=_finish_reason(result),
            )
        ],
        usage=_usage(result),
        pacore=PacoreSummary.of(result, trace_url),
    )


class ChunkWriter:
    """One streamed request's engine events as server-sent OpenAI chunks.

    Progress of the coordinated rounds goes out as ``reasoning_content``
    lines, the final answer as ``content`` deltas while the backend streams
    it. A pass-through request (one round) shows no progress lines.
    """

    def __init__(self, *, request_id: str, model: str, include_usage: bool) -> None:
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage
        self.progress = ProgressState()
        self.references = 0

    def _event(self, chunk: ChatCompletionChunk) -> str:
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    def _delta(self, delta: DeltaMessage, finish_reason: FinishReason | None = None) -> str:
        choice = StreamChoice(delta=delta, finish_reason=finish_reason)
        return self._event(ChatCompletionChunk(id=self.request_id, model=self.model, choices=[choice]))

    def opening(self) -> str:
        return self._delta(DeltaMessage(role="assistant", content=""))

    def on_event(self, event: Event) -> list[str]:
        self.progress.apply(event)
        if isinstance(event, AnswerDelta):
            return [self._delta(DeltaMessage(content=event.content or None, reasoning_content=event.reasoning or None))]
        line = self._progress_line(event)
        return [self._delta(DeltaMessage(reasoning_content=line + "\n"))] if line else []

    def _progress_line(self, event: Event) -> str | None:
        state = self.progress
        if state.total_rounds <= 1:
            return None
        label = state.round_label()
        if isinstance(event, RoundStarted):
            if event.final:
                return f"{label}: synthesizing the final answer from {self.references} references"
            return f"{label}: {event.k} trajectories started"
        if isinstance(event, TrajectoryFinished) and not state.final:
            failed = f" ({state.failed} failed)" if state.failed else ""
            return f"{label}: {state.done}/{state.k} trajectories done{failed}"
        if isinstance(event, RoundFinished) and not event.round.final:
            self.references = len(event.round.messages)
            return round_line(event.round, state.total_rounds)
        return None

    def closing(self, result: Result, trace_url: str) -> list[str]:
        finish = ChatCompletionChunk(
            id=self.request_id,
            model=self.model,
            choices=[StreamChoice(delta=DeltaMessage(), finish_reason=_finish_reason(result))],
            pacore=PacoreSummary.of(result, trace_url),
        )
        events = [self._event(finish)]
        if self.include_usage:
            usage = ChatCompletionChunk(id=self.request_id, model=self.model, choices=[], usage=_usage(result))
            events.append(self._event(usage))
        events.append("data: [DONE]\n\n")
        return events
