"""Results, traces, token accounting and the events the engine emits.

Everything here is a pydantic model, so a trace round-trips through JSON
(``Result.model_dump_json`` / ``Result.model_validate_json``) for the CLI's
``--json``, the run store and the server.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, field_validator

from pacore.messages import compact

if TYPE_CHECKING:
    from pacore.adaptive import ComputePolicy
    from pacore.backends.base import Completion


class Confidence(BaseModel):
    """DeepConf's confidence measures of one trajectory (see :mod:`pacore.confidence`).

    Token confidence is the negative mean log-probability of a token's top
    alternatives: high when the model was sure. Figures, not per-token arrays,
    unless ``tokens`` was asked for (``ComputePolicy.keep_token_confidences``).
    """

    #: Mean token confidence over the whole trajectory.
    mean: float
    #: Lowest mean confidence of any sliding window of ``window`` tokens.
    lowest_group: float
    #: Mean confidence of the last ``window`` tokens.
    tail: float
    #: The window used (the policy's, scaled down for short outputs).
    window: int
    #: Tokens the figures are computed from.
    token_count: int
    tokens: list[float] | None = None


class CallOutcome(BaseModel):
    """What one sampled model call produced: its text, why it ended, its tokens and time, or its failure.

    A backend returns it as a :class:`~pacore.backends.base.Completion`; the engine
    records it in a round as a :class:`Trajectory`.
    """

    text: str = ""
    reasoning: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None
    error_kind: str | None = None
    #: The failed attempts retried before this outcome, e.g. ``("status 503", "timeout")``.
    failed_attempts: tuple[str, ...] = ()

    @field_validator("text", "reasoning")
    @classmethod
    def _replace_lone_surrogates(cls, value: str | None) -> str | None:
        # A server may send a lone surrogate (``"\ud800"`` in its JSON). No UTF-8 can hold
        # one, so the text could be neither sent back in a synthesis prompt, nor printed,
        # nor stored: U+FFFD stands in for it, as for any undecodable byte.
        if value and not value.isascii():
            return _LONE_SURROGATE.sub("\ufffd", value)
        return value

    @property
    def ok(self) -> bool:
        return self.error is None


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class Trajectory(CallOutcome):
    """One sampled call of one round."""

    round: int  # its round's index (0 first)
    index: int  # its place in the round (0 first)
    #: The compacted message passed to the next round; ``None`` if it contributes none.
    message: str | None = None
    #: Position in which this trajectory finished within its round (0 first); ``None`` if unknown.
    #: The reference release orders messages by it (see ``pacore.synthesis``).
    finish_order: int | None = None
    #: DeepConf confidence, when the backend returned logprobs (``ComputePolicy.confidence``).
    confidence: Confidence | None = None
    #: Why an adaptive-compute policy ended this trajectory before it finished
    #: (``"early_stop"``, ``"quorum"``, ``"budget"``); its tokens still count.
    stopped: str | None = None

    @classmethod
    def from_completion(
        cls, round: int, index: int, completion: Completion, compute: ComputePolicy | None = None
    ) -> Trajectory:
        """The trajectory a backend's ``completion`` records, its message compacted.

        ``confidence`` is summarized from the completion's token confidences when it
        has any, with ``compute``'s window and ``keep_token_confidences`` (the
        defaults of :class:`~pacore.adaptive.ComputePolicy` without one).
        """
        # pacore.confidence builds on this module's Confidence, so it is imported here.
        from pacore.adaptive import ComputePolicy
        from pacore.confidence import summarize

        confidence = None
        if completion.token_confidences:
            compute = compute or ComputePolicy()
            confidence = summarize(completion.token_confidences, compute.window, compute.keep_token_confidences)
        shared = {name: getattr(completion, name) for name in CallOutcome.model_fields}
        message = compact(completion.text) if completion.ok else None
        return cls(round=round, index=index, message=message, confidence=confidence, **shared)


class Round(BaseModel):
    """One round: its K trajectories and which messages it was given."""

    index: int
    k: int
    final: bool = False
    trajectories: list[Trajectory] = Field(default_factory=list)
    #: For a synthesis round, ``(round, index)`` of each reference in the order
    #: shown to the model (see ``reference_order``); empty for round 1.
    references: list[tuple[int, int]] = Field(default_factory=list)
    #: The previous round left no message, so the template was skipped and the
    #: original conversation sent unmodified.
    bypassed: bool = False
    #: Messages of the previous round left out of this round's synthesis prompt by
    #: ``ComputePolicy.keep_top`` (least confident first), as ``(round, index)``.
    dropped: list[tuple[int, int]] = Field(default_factory=list)
    #: What an adaptive-compute policy decided for this round, for people
    #: (e.g. ``"adaptive width: answer settled after 8 of 16"``); ``None`` if none acted.
    policy_note: str | None = None
    #: Online early stop: an estimate of the tokens its stopped trajectories would still have
    #: generated (each assumed as long as the round's mean finished trajectory).
    tokens_saved: int | None = None
    #: Quorum: a conservative estimate of the seconds saved by cancelling the stragglers.
    seconds_saved: float | None = None
    started_at: float = 0.0
    elapsed_s: float = 0.0

    @property
    def succeeded(self) -> int:
        return sum(1 for t in self.trajectories if t.ok)

    @property
    def failed(self) -> int:
        return sum(1 for t in self.trajectories if not t.ok)

    @property
    def messages(self) -> list[str]:
        return [t.message for t in self.trajectories if t.message]

    @property
    def completion_tokens(self) -> int:
        return sum(t.completion_tokens for t in self.trajectories)

    @property
    def prompt_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.trajectories)


class Usage(BaseModel):
    """Token totals over every call of every round.

    ``completion_tokens`` is the effective test-time compute (TTC) of the
    request; ``prompt_tokens`` is reported separately because synthesis calls
    re-read the previous round's messages.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    failed_calls: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def count(self, trajectory: Trajectory) -> None:
        """Add one call: ``trajectory``'s tokens, and whether it failed."""
        self.prompt_tokens += trajectory.prompt_tokens
        self.completion_tokens += trajectory.completion_tokens
        self.calls += 1
        self.failed_calls += 0 if trajectory.ok else 1


class Result(BaseModel):
    """The answer of one ``solve`` and the full trace that led to it."""

    answer: str
    schedule: list[int]
    rounds: list[Round]
    usage: Usage
    model: str = ""
    backend: str = ""
    seed: int | None = None
    elapsed_s: float = 0.0
    #: Set when the request failed; the rounds hold what was computed before.
    error: str | None = None

    @property
    def final(self) -> Trajectory | None:
        if not self.rounds or not self.rounds[-1].final or not self.rounds[-1].trajectories:
            return None
        return self.rounds[-1].trajectories[0]


def usage_of(rounds: list[Round]) -> Usage:
    usage = Usage()
    for rnd in rounds:
        for t in rnd.trajectories:
            usage.count(t)
    return usage


# --- events ---------------------------------------------------------------
# Plain, cheap objects: they are created for every trajectory, and progress
# bars, SSE streams, the trace viewer and the run store all consume them.


class RoundStarted(BaseModel):
    type: Literal["round_started"] = "round_started"
    round: int
    k: int
    final: bool
    #: How many rounds the request runs, the final one included.
    total_rounds: int
    #: The previous round left no message: this round is sent the original conversation.
    bypassed: bool = False


class TrajectoryFinished(BaseModel):
    type: Literal["trajectory_finished"] = "trajectory_finished"
    round: int
    trajectory: Trajectory
    #: Trajectories of this round finished so far, this one included.
    done: int
    k: int


class TrajectoryProgress(BaseModel):
    """Tokens received so far by trajectories still running, as they stream.

    Emitted at a throttled rate (a few times a second per round), listing
    only the trajectories that advanced since the round's previous one. A
    count restarts from 0 when a failed attempt is retried from scratch.
    """

    type: Literal["trajectory_progress"] = "trajectory_progress"
    round: int
    #: Trajectory index -> tokens received so far (about one per streamed chunk).
    tokens: dict[int, int]


class AnswerDelta(BaseModel):
    """A piece of the final answer as the backend streams it."""

    type: Literal["answer_delta"] = "answer_delta"
    content: str = ""
    reasoning: str = ""


class RoundFinished(BaseModel):
    type: Literal["round_finished"] = "round_finished"
    round: Round


class Final(BaseModel):
    type: Literal["final"] = "final"
    result: Result


Event = RoundStarted | TrajectoryProgress | TrajectoryFinished | AnswerDelta | RoundFinished | Final
