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

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from pacore.answers import GradingKind
from pacore.synthesis import ReferenceOrder
from pacore.trace import Result


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

    @classmethod
    def of(cls, result: Result, trace_url: str) -> PacoreSummary:
        return cls(
            schedule=result.schedule,
            calls=result.usage.calls,
            failed_calls=result.usage.failed_calls,
            rounds=[
                RoundSummary(
                    round=rnd.index + 1,
                    k=rnd.k,
                    final=rnd.final,
                    succeeded=rnd.succeeded,
                    failed=rnd.failed,
                    prompt_tokens=rnd.prompt_tokens,
                    completion_tokens=rnd.completion_tokens,
                    elapsed_s=round(rnd.elapsed_s, 3),
                )
                for rnd in result.rounds
            ],
            elapsed_s=round(result.elapsed_s, 3),
            backend_model=result.model,
            trace_url=trace_url,
        )


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None


class Choice(OpenAIModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason = "stop"


def _now() -> int:
    return int(time.time())


class ChatCompletion(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None
    pacore: PacoreSummary | None = None


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class StreamChoice(OpenAIModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[StreamChoice]
    usage: CompletionUsage | None = None
    pacore: PacoreSummary | None = None


# --- models and errors -------------------------------------------------------------


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
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
