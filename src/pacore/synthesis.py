"""The synthesis call of a round r > 1: which messages, in which order, in which conversation.

One function, :func:`build_synthesis_input`, used by the engine for every
synthesis round and by the training export, so that what a model is trained
on and what it is later sent cannot drift apart.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from pacore.backends.base import Message
from pacore.messages import last_user_text, synthesis_conversation
from pacore.prompts import SynthesisTemplate
from pacore.trace import Trajectory

ReferenceOrder = Literal["shuffle", "release"]
REFERENCE_ORDERS: tuple[str, ...] = get_args(ReferenceOrder)


@dataclass(frozen=True)
class SynthesisInput:
    """What one synthesis call sends."""

    #: The conversation to send (the original conversation when bypassed).
    conversation: list[Message]
    #: ``(round, index)`` of the trajectories whose messages were used, in prompt order.
    references: list[tuple[int, int]]
    #: No usable message: the template was skipped.
    bypassed: bool
    #: ``(round, index)`` of the messages left out by ``keep_top``, least confident first.
    dropped: list[tuple[int, int]] = field(default_factory=list)


def build_synthesis_input(
    messages: Sequence[Message],
    previous: Sequence[Trajectory],
    *,
    template: SynthesisTemplate,
    order: ReferenceOrder = "shuffle",
    seed: int = 0,
    round_index: int = 1,
    total_rounds: int = 2,
    keep_top: float | None = None,
) -> SynthesisInput:
    """The synthesis call for round ``round_index`` (0-based) from the ``previous`` round's trajectories.

    The last user message of ``messages`` is replaced by the rendered
    template; every other turn, and that message's images, stay. When no
    trajectory left a message (all failed or empty), the template is
    bypassed and ``messages`` is sent unmodified, as the report says.
    With ``keep_top`` only that fraction of the messages, the most confident
    (see :func:`keep_most_confident`), is used.
    """
    dropped: list[Trajectory] = []
    if keep_top is not None:
        previous, dropped = keep_most_confident(previous, keep_top)
    ordered = ordered_references(previous, order, seed, round_index)
    if not ordered:
        return SynthesisInput(conversation=list(messages), references=[], bypassed=True)
    prompt = template.render(
        problem=last_user_text(messages),
        references=[t.message for t in ordered],  # type: ignore[misc]  # ordered keeps messages only
        round=round_index + 1,
        total_rounds=total_rounds,
    )
    return SynthesisInput(
        conversation=synthesis_conversation(messages, prompt),
        references=[(t.round, t.index) for t in ordered],
        bypassed=False,
        dropped=[(t.round, t.index) for t in dropped],
    )


def keep_most_confident(previous: Sequence[Trajectory], fraction: float) -> tuple[list[Trajectory], list[Trajectory]]:
    """DeepConf's confidence filtering: the most confident ``fraction`` of the trajectories that left a message.

    Ranked by lowest group confidence (DeepConf's measure for filtering and
    early stop), ties broken by index; a trajectory without recorded confidence
    ranks below every one with it; when none has any, all are kept (there is
    nothing to rank by). At least one is kept. Returns ``(kept, dropped)``:
    kept in index order, dropped least confident first.
    """
    usable = [t for t in sorted(previous, key=lambda t: t.index) if t.message]
    if not any(t.confidence for t in usable):
        return usable, []
    # Rounded before the ceiling so that 0.28 of 25 is 7, not 8 (0.28 * 25 == 7.000000000000001).
    keep = max(1, math.ceil(round(fraction * len(usable), 9)))
    ranked = sorted(usable, key=lambda t: (t.confidence is None, -t.confidence.lowest_group if t.confidence else 0.0))
    kept = sorted(ranked[:keep], key=lambda t: t.index)
    return kept, ranked[keep:][::-1]


def ordered_references(
    previous: Sequence[Trajectory], order: ReferenceOrder, seed: int, round_index: int
) -> list[Trajectory]:
    """The trajectories that left a message, in the order the prompt shows them."""
    if order == "shuffle":
        usable = [t for t in sorted(previous, key=lambda t: t.index) if t.message]
        # Seeded per request and round: reproducible, and no position bias.
        random.Random(f"pacore:{seed}:{round_index}").shuffle(usable)
        return usable
    if order == "release":
        return _release_order(previous, seed)
    raise ValueError(f"unknown reference order {order!r} (expected one of {', '.join(REFERENCE_ORDERS)})")


def _release_order(previous: Sequence[Trajectory], seed: int) -> list[Trajectory]:
    """The order of the reference release (stepfun-ai/PaCoRe, ``pacore/batch_inference/base_exp.py``,
    ``Exp._run_parallel_calls``), reproduced step for step.

    The release collects the K responses of a round with ``asyncio.as_completed``
    (a failed call appends ``content=""``), sorts them with
    ``responses.sort(key=lambda x: len(x["content"]))`` (stable, so ties stay in
    completion order), shuffles with a *fresh* ``random.Random(self.random_seed)``
    on every call (seed 42, the same for every problem and round), and only
    then drops the responses whose content is empty.
    """
    completed = sorted(previous, key=completion_position)
    completed.sort(key=lambda t: len(t.text) if t.ok else 0)
    random.Random(seed).shuffle(completed)
    return [t for t in completed if t.message]


def completion_position(trajectory: Trajectory) -> tuple[int, int]:
    """Sort key of the order in which a round's trajectories finished.

    Trajectories without a recorded ``finish_order`` (adopted from a pool, or
    from an older trace) count as finishing in index order.
    """
    finish = trajectory.finish_order
    return (trajectory.index if finish is None else finish, trajectory.index)
