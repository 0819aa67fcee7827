"""The OpenAI chat completions protocol as pydantic models, field for field.

Requests are validated here and nowhere else; responses, stream chunks and
errors are built from these models only, so streamed and non-streamed
answers cannot drift apart. PaCoRe's additions are two optional fields: a
``pacore`` object in the request (``extra_body={"pacore": {...}}`` in the
SDK) and a ``pacore`` summary object in the response.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from pacore.adaptive import ComputePolicy
from pacore.answers import GradingKind
from pacore.synthesis import ReferenceOrder
from pacore.trace import Result, Round


class OpenAIModel(BaseModel):
    # Clients send fields this server does not use (user, metadata, store...);
    # the OpenAI API accepts them, so must we.
    model_config = ConfigDict(extra="allow")


# --- request ------------------------------------------------------------------


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ImageURL(OpenAIModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(OpenAIModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(OpenAIModel):
    include_usage: StrictBool | None = None


class PacoreOptions(BaseModel):
    """The request's ``pacore`` extension object."""

    model_config = ConfigDict(extra="forbid")

    #: Coordinated rounds: a list of counts (``[32, 4]``; ``[]`` passes straight
    #: through), one count, or a preset name / comma form (``"high"``, ``"32,4"``).
    schedule: list[StrictInt] | StrictInt | str | None = None
    #: Order of the references in synthesis prompts: ``"shuffle"`` or ``"release"``
    #: (the reference release's order; send ``seed: 42`` to match it). Default: the server's.
    reference_order: ReferenceOrder | None = None
    #: How answers are read (a grading kind, see :mod:`pacore.eval.grading`). Only
    #: with it does the trace viewer show extracted answers and their votes.
    grading: GradingKind | None = None
    #: Adaptive-compute policies, the fields of :class:`pacore.ComputePolicy`
    #: (``{"keep_top": 0.5, "early_stop": true}``); all off when absent.
    compute: ComputePolicy | None = None

    @field_validator("compute", mode="before")
    @classmethod
    def _strict_compute(cls, value: Any) -> Any:
        # Strict like the OpenAI fields: "0.5" is not a number, 1 is not true.
        return ComputePolicy.model_validate(value, strict=True) if isinstance(value, dict) else value


class ChatCompletionRequest(OpenAIModel):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str
    # Strict where OpenAI's schema is typed: true is not a number, "yes" is not a boolean.
    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    n: Annotated[StrictInt, Field(ge=1)] | None = 1
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[StrictFloat, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2, le=2)] | None = None
    # Declared so that asking for them is refused clearly instead of ignored.
    logprobs: StrictBool | None = None
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    pacore: PacoreOptions | None = None


# --- response -------------------------------------------------------------------


FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]


class CompletionUsage(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class RoundSummary(BaseModel):
    round: int
    k: int
    final: bool
    succeeded: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    elapsed_s: float

    @classmethod
    def of(cls, rnd: Round) -> RoundSummary:
        """``rnd``'s figures under the same names, but numbered from 1 and timed to the millisecond."""
        same = {name: getattr(rnd, name) for name in cls.model_fields.keys() - {"round", "elapsed_s"}}
        return cls(round=rnd.index + 1, elapsed_s=round(rnd.elapsed_s, 3), **same)


class ComputeSummary(BaseModel):
    """What the request's adaptive-compute policies did (present only when a policy was on)."""

    #: The policy fields the request set (the others are at their defaults).
    policy: dict[str, Any]
    #: Trajectories a policy ended early, by reason (``early_stop``, ``quorum``, ``budget``).
    stopped: dict[str, int]
    #: Tokens those stopped trajectories generated before they were stopped (counted in ``usage``).
    stopped_tokens: int
    #: Early stop's estimate of the tokens the stopped trajectories would still have generated.
    tokens_saved: int
    #: Quorum's estimate of the seconds saved by cancelling stragglers.
    seconds_saved: float
    #: Messages left out of synthesis prompts by ``keep_top``.
    dropped: int
    #: Trajectories that recorded confidence figures, and their mean token confidence.
    with_confidence: int
    mean_confidence: float | None
    #: Each round's policy note, as ``"round N: ..."``.
    notes: list[str]

    @classmethod
    def of(cls, result: Result, policy: ComputePolicy) -> ComputeSummary:
        trajectories = [t for rnd in result.rounds for t in rnd.trajectories]
        stopped: dict[str, int] = {}
        for t in trajectories:
            if t.stopped:
                stopped[t.stopped] = stopped.get(t.stopped, 0) + 1
        confident = [t.confidence.mean for t in trajectories if t.confidence is not None]
        return cls(
            policy=policy.model_dump(exclude_defaults=True),
            stopped=stopped,
            stopped_tokens=sum(t.completion_tokens for t in trajectories if t.stopped),
            tokens_saved=sum(rnd.tokens_saved or 0 for rnd in result.rounds),
            seconds_saved=round(sum(rnd.seconds_saved or 0.0 for rnd in result.rounds), 3),
            dropped=sum(len(rnd.dropped) for rnd in result.rounds),
            with_confidence=len(confident),
            mean_confidence=round(sum(confident) / len(confident), 4) if confident else None,
            notes=[f"round {rnd.index + 1}: {rnd.policy_note}" for rnd in result.rounds if rnd.policy_note],
        )


class PacoreSummary(BaseModel):
    """The response's ``pacore`` extension: how the answer was computed."""

    schedule: list[int]
    #: ``usage`` counts every call of every round, not just the final answer.
    usage_scope: Literal["all_rounds"] = "all_rounds"
    calls: int
    failed_calls: int
    rounds: list[RoundSummary]
    elapsed_s: float
    backend_model: str
    #: Where the server's trace viewer shows this request.
    trace_url: str
    #: What the adaptive-compute policies did; left out when none was on.
    compute: ComputeSummary | None = Field(default=None, exclude_if=lambda value: value is None)

    @classmethod
    def of(cls, result: Result, trace_url: str, policy: ComputePolicy | None = None) -> PacoreSummary:
        return cls(
            schedule=result.schedule,
            calls=result.usage.calls,
            failed_calls=result.usage.failed_calls,
            rounds=[RoundSummary.of(rnd) for rnd in result.rounds],
            elapsed_s=round(result.elapsed_s, 3),
            backend_model=result.model,
            trace_url=trace_url,
            compute=None if policy is None or policy.is_default else ComputeSummary.of(result, policy),
        )


# A streamed piece of the assistant's message: what one chunk adds (the role only in the first).
class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


# The whole message of a non-streamed response: a delta's fields, the role always set.
class AssistantMessage(DeltaMessage):
    role: Literal["assistant"] = "assistant"
    refusal: str | None = None


class Choice(OpenAIModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason = "stop"


def _now() -> int:
    return int(time.time())


class OpenAIObject(OpenAIModel):
    """The fields every object of the OpenAI API begins with; each kind fixes ``object`` to its name."""

    id: str
    object: str
    created: int = Field(default_factory=_now)


class ChatCompletion(OpenAIObject):
    object: Literal["chat.completion"] = "chat.completion"
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None
    pacore: PacoreSummary | None = None


class StreamChoice(OpenAIModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(OpenAIObject):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    model: str
    choices: list[StreamChoice]
    usage: CompletionUsage | None = None
    pacore: PacoreSummary | None = None


# --- models and errors -------------------------------------------------------------


class ModelCard(OpenAIObject):
    object: Literal["model"] = "model"
    owned_by: str = "pacore"


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
