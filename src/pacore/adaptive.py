"""Adaptive compute: policies that spend tokens where they change the answer.

Every policy is off by default, so the paper's method (fixed K per round,
every message synthesized) stays what ``asolve`` does. One
:class:`ComputePolicy` value carries them through every front door: the
Python API (``asolve(..., compute=ComputePolicy(...))``), the CLI flags, the
server's ``pacore`` request field and ``pacore run``.

Sources: DeepConf (Fu et al., 2025, "Deep Think with Confidence") for token
confidence, confidence-filtered synthesis and online early stop;
Adaptive-Consistency (Aggarwal et al., 2023) for the stopping test of
adaptive width; short-m@k / quorum for ending a round on its first finishers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pacore.flags import Flag

#: Most ``top_logprobs`` an OpenAI-compatible server accepts.
MAX_TOP_LOGPROBS = 20

#: A share of a round's trajectories (more than none, at most all), or ``None``: the policy is off.
_RoundShare = Annotated[float | None, Field(gt=0, le=1)]


class ComputePolicy(BaseModel):
    """Which adaptive-compute policies a request uses (all off by default)."""

    # defer_build: the validator is built when a policy is first made, not when the CLI reads the fields.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, defer_build=True)

    #: Implied by ``keep_top`` and ``early_stop``.
    confidence: Annotated[
        bool, Flag("--confidence", "Request token logprobs and record DeepConf's confidence figures per trajectory.")
    ] = False
    #: The ``top_logprobs`` each call requests.
    top_logprobs: Annotated[
        int,
        Field(ge=1, le=MAX_TOP_LOGPROBS),
        Flag(
            "--top-logprobs",
            f"Alternatives per token the confidence is computed from (1 to {MAX_TOP_LOGPROBS}).",
            metavar="K",
        ),
    ] = 5
    window: Annotated[
        int,
        Field(ge=1),
        Flag(
            "--confidence-window",
            "Tokens per sliding window of group confidence, scaled down for short outputs.",
            metavar="N",
        ),
    ] = 2048
    #: Keep per-token confidences in the trace, not only the summary figures.
    keep_token_confidences: bool = False

    keep_top: Annotated[
        _RoundShare,
        Flag(
            "--keep-top",
            "Synthesize only this fraction of a round's messages, the most confident (e.g. 0.5).",
            metavar="FRACTION",
        ),
    ] = None

    early_stop: Annotated[
        bool,
        Flag(
            "--early-stop",
            "Cancel a trajectory mid-stream once its windowed confidence falls below the threshold its round's "
            "warm-up set.",
        ),
    ] = False
    warmup: Annotated[
        int,
        Field(ge=1),
        Flag("--warmup", "Trajectories per round that finish before early stop sets its threshold.", metavar="N"),
    ] = 4
    #: DeepConf-high keeps 90%: percentile 10; DeepConf-low keeps 10%: percentile 90.
    early_stop_percentile: Annotated[
        float,
        Field(gt=0, lt=100),
        Flag(
            "--early-stop-percentile",
            "Early stop's threshold: this percentile of the warm-up's lowest group confidence; 10 keeps ~90%, "
            "90 keeps ~10%.",
            metavar="P",
        ),
    ] = 10.0
    #: Every later trajectory is then judged from its first window. Off: the warm-up runs in
    #: parallel with the rest.
    warmup_first: Annotated[
        bool,
        Flag(
            "--warmup-first",
            "Open the rest of a round only once its warm-up has finished (DeepConf's online algorithm: more tokens "
            "saved, about one trajectory's time more per round).",
        ),
    ] = False

    adaptive_k: Annotated[
        bool, Flag("--adaptive-k", "Sample round 1 in waves and stop once the leading answer is settled.")
    ] = False
    wave: Annotated[int, Flag("--wave", "Trajectories per wave of --adaptive-k.", metavar="N")] = Field(default=4, ge=1)
    #: The runner-up is the leading answer's rival.
    settle_threshold: Annotated[
        float,
        Field(gt=0.5, lt=1),
        Flag(
            "--settle-threshold",
            "Posterior probability that the leading answer is the majority one needed to stop sampling (0.5 to 1).",
            metavar="P",
        ),
    ] = 0.95

    quorum: Annotated[
        _RoundShare,
        Flag(
            "--quorum",
            "End a round once this fraction of its trajectories has finished; cancel the rest.",
            metavar="FRACTION",
        ),
    ] = None
    straggler_timeout: Annotated[
        float | None,
        Field(ge=0),
        Flag("--straggler-timeout", "Once --quorum is met, wait at most this long for the rest.", metavar="SECONDS"),
    ] = None

    budget_tokens: Annotated[
        int | None,
        Field(ge=1),
        Flag(
            "--budget-tokens",
            "Cap on generated tokens per problem: no trajectory is opened that could exceed it.",
            metavar="N",
        ),
    ] = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        # A setting of a policy that is off would be silently ignored: refuse it instead.
        for setting, policy in _SETTINGS_OF.items():
            if getattr(self, setting) != type(self).model_fields[setting].default and not getattr(self, policy):
                raise ValueError(f"{setting} needs {policy}")
        return self

    @property
    def wants_confidence(self) -> bool:
        """Whether calls must request logprobs."""
        return self.confidence or self.keep_top is not None or self.early_stop

    @property
    def is_default(self) -> bool:
        """No policy is on: the paper's method."""
        return self == POLICIES_OFF

    @property
    def per_trajectory(self) -> bool:
        """Whether a policy decides per trajectory, so that each call samples one (``n=1``)."""
        return self.early_stop or self.adaptive_k or self.quorum is not None or self.budget_tokens is not None

    @property
    def confidence_only(self) -> bool:
        """Only the confidence settings are on (what sampling a pool may use)."""
        return not (self.per_trajectory or self.keep_top is not None)


#: The settings that only mean something with a policy on, and that policy.
_SETTINGS_OF = {
    "warmup": "early_stop",
    "early_stop_percentile": "early_stop",
    "warmup_first": "early_stop",
    "wave": "adaptive_k",
    "settle_threshold": "adaptive_k",
    "straggler_timeout": "quorum",
}

#: Every policy off: the paper's method (a policy is immutable, so one serves every request). Its
#: defaults need no validation: importing this module builds no validator.
POLICIES_OFF = ComputePolicy.model_construct()


def majority_probability(leader: int, others: int) -> float:
    """``P(p > 1/2)`` for ``p ~ Beta(leader + 1, others + 1)``: how sure the leading answer is the majority.

    Adaptive-Consistency's Beta stopping test (Aggarwal et al., 2023) with a
    uniform prior, after ``leader`` votes for the leading answer and ``others``
    for its rival (the engine passes the runner-up's votes, as the method's
    authors do). Exact: with integer parameters the Beta CDF is a binomial tail,
    ``I_x(a, b) = P(Binomial(a + b - 1, x) >= a)``, so with ``n = leader + others + 1``
    the probability is ``sum(C(n, j) for j <= leader) / 2**n``.
    """
    if leader < 0 or others < 0:
        raise ValueError(f"vote counts must be non-negative, got {leader} and {others}")
    n = leader + others + 1
    return sum(math.comb(n, j) for j in range(leader + 1)) / 2**n


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolating linearly between ranks (numpy's default)."""
    if not values:
        raise ValueError("a percentile needs at least one value")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
