"""Outcome rewards for RL training: 1.0 when the verified final answer is correct, else 0.0.

The same grader plugs into two trainers:

- verl: ``custom_reward_function.path=<path to this file>``
  ``custom_reward_function.name=compute_score`` (called as
  ``compute_score(data_source, solution_str, ground_truth, extra_info)``);
- TRL: ``GRPOTrainer(reward_funcs=[pacore.rewards.reward_func], ...)`` with a
  ``ground_truth`` column in the data set.

Reasoning before the last ``</think>`` is dropped before grading (the
compaction of :func:`pacore.messages.compact`); a response that opened
``<think>`` and never closed it was cut off and earns 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pacore.backends.base import text_of
from pacore.messages import THINK_END, compact
from pacore.errors import UsageError
from pacore.eval.grading import grade

_THINK_START = "<think>"


def outcome_reward(response_text: str | None, ground_truth: str | None, kind: str = "auto") -> float:
    """1.0 if the response's final answer matches ``ground_truth``, else 0.0 (also when either is missing)."""
    if not response_text or (_THINK_START in response_text and THINK_END not in response_text):
        return 0.0
    return 1.0 if grade(compact(response_text), ground_truth, kind) else 0.0


def _kind_for(data_source: str | None, extra_info: dict[str, Any] | None) -> str:
    if extra_info and isinstance(extra_info.get("kind"), str):
        return extra_info["kind"]
    return "number" if data_source and "gsm8k" in data_source.lower() else "auto"


def compute_score(
    data_source: str | None,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """verl reward function: the outcome reward of one decoded response.

    The grading kind is ``extra_info["kind"]`` when given, ``number`` for a
    ``data_source`` naming GSM8K, else ``auto``. ``ground_truth`` may be the
    answer or ``{"answer": ...}``. A missing ground truth is a data error
    (verl cannot skip a sample), so it raises :class:`UsageError`.
    """
    answer = _answer_of(ground_truth)
    if answer is None:
        raise UsageError(f"compute_score: no ground truth for a sample of {data_source or 'unknown source'}")
    return outcome_reward(solution_str, answer, _kind_for(data_source, extra_info))


def reward_func(
    prompts: Sequence[Any] | None = None,
    completions: Sequence[Any] | None = None,
    ground_truth: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """TRL ``GRPOTrainer`` reward function.

    ``completions`` are strings (standard format) or lists of chat messages
    (conversational format; the last message's content is graded).
    ``ground_truth`` is the data set column of that name (an ``answer``
    column is used when there is none); an optional ``kind`` column picks the
    grading kind per sample. Samples without a ground truth get ``None``,
    which TRL skips.
    """
    completions = list(completions or [])
    truths = ground_truth if ground_truth is not None else kwargs.get("answer")
    if truths is None:
        raise UsageError("reward_func needs a 'ground_truth' (or 'answer') column in the data set")
    truths = list(truths)
    kinds = list(kwargs.get("kind") or ["auto"] * len(completions))
    if not len(truths) == len(kinds) == len(completions):
        raise UsageError(
            f"reward_func got {len(completions)} completions but {len(truths)} ground truths "
            f"and {len(kinds)} kinds"
        )
    rewards: list[float | None] = []
    for completion, truth, kind in zip(completions, truths, kinds, strict=True):
        answer = _answer_of(truth)
        text = _completion_text(completion)
        rewards.append(None if answer is None else outcome_reward(text, answer, kind or "auto"))
    return rewards


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return text_of(completion.get("content"))
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return text_of(completion[-1].get("content"))
    return ""


def _answer_of(ground_truth: Any) -> str | None:
    if isinstance(ground_truth, dict):
        ground_truth = ground_truth.get("answer")
    if ground_truth is None:
        return None
    text = str(ground_truth).strip()
    return text or None
