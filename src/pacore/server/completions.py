"""Chat completion requests in, engine arguments out; results and events back to OpenAI shapes.

Pure translation: nothing here runs the engine or touches HTTP. The
schedule of a request comes from, in order, the body's ``pacore.schedule``,
a model name ``pacore-<preset or counts>/<model>``, the server default.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import Any

import pydantic_core

from pacore.adaptive import ComputePolicy
from pacore.backends.base import GenerationParams, Message
from pacore.engine import normalize_messages
from pacore.errors import ScheduleError
from pacore.progress import ProgressState, round_line
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
from pacore.server.settings import Limits
from pacore.synthesis import ReferenceOrder, keep_most_confident
from pacore.trace import AnswerDelta, Event, Result, RoundFinished, RoundStarted, TrajectoryFinished

# "pacore-high/qwen3-8b", "pacore-16/qwen3-8b", "pacore-32,4/m", "pacore-off"
_PACORE_MODEL = re.compile(r"pacore-(?P<spec>[^/]*)(?:/(?P<model>.*))?", re.IGNORECASE | re.DOTALL)
#: In a model name, ``pacore-1`` means one call: the request passes straight through.
PASSTHROUGH_ALIAS = "1"

_FINISH_REASONS: frozenset[str] = frozenset({"stop", "length", "content_filter", "tool_calls"})


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
    #: The grading kind the request named (``pacore.grading``), for the trace viewer.
    grading: str | None = None
    #: The request's adaptive-compute policy (``pacore.compute``); ``None``: the server's.
    compute: ComputePolicy | None = None


def parse_body(body: bytes, content_type: str | None = None, limits: Limits = Limits()) -> ChatCompletionRequest:
    """The request body as a validated request, in time linear in its size.

    400 for bad UTF-8, bad JSON (lone surrogates, NaN and numbers too long to
    convert included), nesting deeper than the parser's limit, a field over
    ``limits`` (checked on the parsed JSON, before any model object is built)
    or bad fields; 415 when ``content_type`` says the body is not JSON (a
    missing one is taken as JSON, as curl users often forget it).
    """
    media_type = (content_type or "application/json").partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaTypeError(
            f"the request body must be JSON (Content-Type: application/json), not {media_type[:60]}"
        )
    # Parsing builds a Python object per value, ~0.1 to 2 µs each: 8 MiB of [0,0,...] or of
    # {} would hold the event loop for seconds, so the values are counted first, at memchr speed.
    values = count_json_values(body, limits.max_json_values)
    if values > limits.max_json_values:
        raise InvalidRequestError(
            f"the request body holds more than {limits.max_json_values:,} JSON values (about {values:,})",
            code="too_many_json_values",
        )
    try:
        # pydantic's Rust parser, not json.loads: it has a nesting limit instead of a
        # RecursionError, and refuses the lone surrogates json.loads lets through.
        data = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidRequestError(_json_problem(body, str(exc))) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    check_sizes(data, limits)
    # A ValidationError is described by pacore.server.errors like FastAPI's own.
    return ChatCompletionRequest.model_validate(data)


_FEW_STRINGS = 1000


def count_json_values(body: bytes, limit: int) -> int:
    """About how many values the JSON text ``body`` holds (never fewer), in a few passes of C code.

    Strings are counted by their quotes once escapes are removed; other values
    by the commas and opening brackets, at first wherever they are (no copy of
    the body), then, only when that is over ``limit``, outside strings alone.
    """
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    strings = body.count(b'"') // 2
    if strings > limit:
        return strings
    separators = _separators(body)
    if separators > limit:
        # Too many, counting those inside strings: take those out, string by string if
        # there are few (no copy of the body), else all at once.
        if strings <= _FEW_STRINGS:
            end = -1
            while (start := body.find(b'"', end + 1)) >= 0 and (end := body.find(b'"', start + 1)) >= 0:
                separators -= _separators(body, start, end)
        else:
            separators = _separators(b"".join(body.split(b'"')[::2]))  # at most 2 * limit + 1 pieces
    return max(strings, separators + 1)


def _separators(text: bytes, start: int = 0, end: int | None = None) -> int:
    return text.count(b",", start, end) + text.count(b"[", start, end) + text.count(b"{", start, end)


def check_sizes(data: dict[str, Any], limits: Limits) -> None:
    """Refuse a parsed body whose fields are over ``limits``; looks at lengths only, never at content."""
    messages = data.get("messages")
    if isinstance(messages, list):
        if len(messages) > limits.max_messages:
            raise _over_limit(
                "messages", f"{len(messages):,} messages", f"{limits.max_messages:,}", "too_many_messages"
            )
        for index, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and len(content) > limits.max_content_parts:
                raise _over_limit(
                    f"messages.{index}.content", f"{len(content):,} content parts",
                    f"{limits.max_content_parts:,}", "too_many_content_parts",
                )  # fmt: skip
    model = data.get("model")
    if isinstance(model, str) and len(model) > limits.max_model_chars:
        raise _over_limit(
            "model", f"a name of {len(model):,} characters", f"{limits.max_model_chars:,}", "model_too_long"
        )
    options = data.get("pacore")
    if isinstance(options, dict):
        _check_rounds(options.get("schedule"), "pacore.schedule", limits)


def _over_limit(param: str, found: str, limit: str, code: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {found}; this server accepts at most {limit}", param=param, code=code)


def _check_rounds(schedule: object, param: str, limits: Limits) -> None:
    """Refuse a raw schedule (list or text) with more rounds than allowed, before it is parsed."""
    if isinstance(schedule, list):
        rounds = len(schedule)
    elif isinstance(schedule, str):
        rounds = schedule.count(",") + 1  # "32,4" and "[32, 4]": one more than the commas
    else:
        return
    if rounds > limits.max_rounds:
        raise InvalidRequestError(
            f"{param}: a schedule of {rounds:,} coordinated rounds; this server allows at most {limits.max_rounds}",
            param=param,
            code="schedule_too_large",
        )


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
    schedule, param = resolve_schedule(request, default, limits)
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
        grading=request.pacore.grading if request.pacore else None,
        compute=request.pacore.compute if request.pacore else None,
    )


def resolve_schedule(
    request: ChatCompletionRequest, default: Schedule, limits: Limits = Limits()
) -> tuple[Schedule, str | None]:
    """The request's schedule and the field it came from (``None``: server default)."""
    if request.pacore is not None and request.pacore.schedule is not None:
        return _parse_schedule(request.pacore.schedule, "pacore.schedule"), "pacore.schedule"
    match = _PACORE_MODEL.fullmatch(request.model.strip())
    if match:
        spec = match["spec"].strip()
        if spec == PASSTHROUGH_ALIAS:
            return Schedule(()), "model"
        _check_rounds(spec, "model", limits)
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
        raise InvalidRequestError("only the text response_format is supported by pacore serve", param="response_format")


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


def completion_of(
    result: Result, *, request_id: str, model: str, trace_url: str, policy: ComputePolicy | None = None
) -> ChatCompletion:
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
        pacore=PacoreSummary.of(result, trace_url, policy),
    )


def _json(text: str) -> str:
    """``text`` as a JSON string, encoded as pydantic's model_dump_json encodes it."""
    return pydantic_core.to_json(text).decode()


class ChunkWriter:
    """One streamed request's engine events as server-sent OpenAI chunks.

    Progress of the coordinated rounds goes out as ``reasoning_content``
    lines, the final answer as ``content`` deltas while the backend streams
    it. A pass-through request (one round) shows no progress lines.
    """

    def __init__(
        self, *, request_id: str, model: str, include_usage: bool, policy: ComputePolicy | None = None
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage
        self.policy = policy
        self.progress = ProgressState()
        self.references = 0
        # Answer deltas are most of a stream (one a token): framed from these fixed pieces, the
        # bytes model_dump_json gives, without building three pydantic models per token.
        self._delta_head = f'data: {{"id":{_json(request_id)},"object":"chat.completion.chunk","created":'
        self._delta_middle = f',"model":{_json(model)},"choices":[{{"index":0,"delta":{{'

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
            return [self._answer_delta(event.content, event.reasoning)]
        line = self._progress_line(event)
        return [self._delta(DeltaMessage(reasoning_content=line + "\n"))] if line else []

    def _answer_delta(self, content: str, reasoning: str) -> str:
        """``_delta(DeltaMessage(content=content or None, reasoning_content=reasoning or None))``, faster."""
        fields = []
        if content:
            fields.append('"content":' + _json(content))
        if reasoning:
            fields.append('"reasoning_content":' + _json(reasoning))
        return f"{self._delta_head}{int(time.time())}{self._delta_middle}{','.join(fields)}}}}}]}}\n\n"

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
            keep_top = self.policy.keep_top if self.policy is not None else None
            # What the synthesis prompt will hold: keep-top's choice, counted as pacore.synthesis makes it.
            kept = keep_most_confident(event.round.trajectories, keep_top)[0] if keep_top else event.round.messages
            self.references = len(kept)
            note = event.round.policy_note
            return round_line(event.round, state.total_rounds) + (f" ({note})" if note else "")
        return None

    def closing(self, result: Result, trace_url: str) -> list[str]:
        finish = ChatCompletionChunk(
            id=self.request_id,
            model=self.model,
            choices=[StreamChoice(delta=DeltaMessage(), finish_reason=_finish_reason(result))],
            pacore=PacoreSummary.of(result, trace_url, self.policy),
        )
        events = [self._event(finish)]
        if self.include_usage:
            usage = ChatCompletionChunk(id=self.request_id, model=self.model, choices=[], usage=_usage(result))
            events.append(self._event(usage))
        events.append("data: [DONE]\n\n")
        return events
