"""Rewards for RL training of the synthesis step, for verl and TRL.

The default is the report's outcome reward: 1.0 when the verified final
answer is correct, else 0.0. Two options from the same group of papers:

- **process** (in the spirit of PRIME): the answer must be correct *and* an
  LLM verifier (:mod:`pacore.verifier`, any backend pacore can call) must
  judge the derivation valid; a right answer reached by a broken derivation
  earns 0;
- **PAR** (Preference As Reward) shaping of reward-model scores:
  ``(1/M) * sum_m sigmoid(r - r_ref_m)``, bounded in (0, 1).

The same graders plug into two trainers:

- verl: ``custom_reward_function.path=<path to this file, or to pacore/rewards.py>``
  ``custom_reward_function.name=compute_score`` (called as
  ``compute_score(data_source, solution_str, ground_truth, extra_info)``);
  ``custom_reward_function.reward_kwargs.verifier=<backend spec>`` turns on the
  process reward (verl passes ``reward_kwargs`` as keywords);
- TRL: ``GRPOTrainer(reward_funcs=[pacore.eval.rewards.reward_func], ...)`` with a
  ``ground_truth`` column in the data set, or
  ``make_reward_func("process", verifier=...)``.

Reasoning before the last ``</think>`` is dropped before grading (the
compaction of :func:`pacore.messages.compact`); a response that opened
``<think>`` and never closed it was cut off and earns 0.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pacore.errors import UsageError
from pacore.eval.grading import grade
from pacore.messages import THINK_END, compact, last_user_text, text_of
from pacore.verifier import Judgement, Verifier

RewardName = Literal["outcome", "process"]
REWARDS: tuple[RewardName, ...] = ("outcome", "process")
TrlRewardFunc = Callable[..., list[float | None]]

_THINK_START = "<think>"
# The largest float below 1 and the smallest above 0: PAR stays inside (0, 1)
# even where the sigmoid rounds to 0 or 1.
_PAR_LOW = math.ulp(0.0)
_PAR_HIGH = 1.0 - math.ulp(1.0) / 2


def outcome_reward(response_text: str | None, ground_truth: str | None, kind: str = "auto") -> float:
    """1.0 if the response's final answer matches ``ground_truth``, else 0.0 (also when either is missing)."""
    if not response_text or (_THINK_START in response_text and THINK_END not in response_text):
        return 0.0
    return 1.0 if grade(compact(response_text), ground_truth, kind) else 0.0


def process_rewards(
    problems: Sequence[str],
    responses: Sequence[str | None],
    ground_truths: Sequence[str | None],
    kinds: Sequence[str],
    verifier: Verifier,
) -> list[float | None]:
    """Process-aware rewards: 1.0 when the answer is correct and the verifier accepts the derivation.

    Only correct answers are sent to the verifier (one batch, cached); a
    wrong answer is 0.0 without a call. ``None`` where the verifier gave no
    verdict (its call failed or its answer had no ``VERDICT`` line).
    """
    outcomes = [outcome_reward(r, t, k) for r, t, k in zip(responses, ground_truths, kinds, strict=True)]
    asked = [i for i, outcome in enumerate(outcomes) if outcome == 1.0]
    items = [Judgement(problems[i], compact(responses[i]) or "", str(ground_truths[i])) for i in asked]
    verdicts = dict(zip(asked, verifier.verify_many(items), strict=True))
    rewards: list[float | None] = []
    for i, outcome in enumerate(outcomes):
        if outcome == 0.0:
            rewards.append(0.0)
        else:
            verdict = verdicts[i]
            rewards.append(None if verdict is None else float(verdict))
    return rewards


def par_reward(score: float, reference_scores: Sequence[float]) -> float:
    """PAR shaping of a reward-model score against reference scores, strictly inside (0, 1).

    ``(1/M) * sum_m sigmoid(score - reference_m)``: 0.5 when the response
    scores like the references, near 1 when it beats them all. The bound
    keeps a reward model's drifting scale from being exploited.
    """
    references = list(reference_scores)
    if not references:
        raise UsageError("par_reward needs at least one reference score")
    values = [float(score), *map(float, references)]
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"par_reward needs finite scores, got {score!r} against {references!r}")
    shaped = sum(_sigmoid(float(score) - float(r)) for r in references) / len(references)
    return min(max(shaped, _PAR_LOW), _PAR_HIGH)


def _sigmoid(x: float) -> float:
    # Two branches so that exp never overflows.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def par_shaped(score_func: TrlRewardFunc, reference_column: str = "reference_scores") -> TrlRewardFunc:
    """A TRL reward function: ``score_func``'s raw scores shaped with :func:`par_reward`.

    The reference scores of each prompt come from the data set column
    ``reference_column`` (a list of numbers per row, e.g. the reward model's
    scores of the reference responses). A sample whose raw score is ``None``
    stays ``None``.
    """

    def shaped(
        prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None, **kwargs: Any
    ) -> list[float | None]:
        references = kwargs.get(reference_column)
        if references is None:
            raise UsageError(f"PAR shaping needs a {reference_column!r} column in the data set")
        scores = score_func(prompts=prompts, completions=completions, **kwargs)
        return [None if s is None else par_reward(s, refs) for s, refs in zip(scores, references, strict=True)]

    shaped.__name__ = f"par_{getattr(score_func, '__name__', 'score')}"
    return shaped


def _kind_for(data_source: str | None, extra_info: dict[str, Any] | None) -> str:
    if extra_info and isinstance(extra_info.get("kind"), str):
        return extra_info["kind"]
    return "number" if data_source and "gsm8k" in data_source.lower() else "auto"


_verifiers: dict[tuple[Any, ...], Verifier] = {}
_verifiers_lock = threading.Lock()


def shared_verifier(
    spec: str,
    *,
    template: str | Path | None = None,
    model: str | None = None,
    cache: str | Path | None = None,
) -> Verifier:
    """One :class:`Verifier` per settings per process (verl calls the reward function once per sample)."""
    key = (spec, str(template) if template else None, model, str(cache) if cache else None)
    with _verifiers_lock:
        if key not in _verifiers:
            options: dict[str, Any] = {"model": model} if model else {}
            _verifiers[key] = Verifier(spec, template=template, cache=cache, **options)
        return _verifiers[key]


def compute_score(
    data_source: str | None,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    *,
    verifier: str | None = None,
    verifier_template: str | None = None,
    verifier_model: str | None = None,
    verifier_cache: str | None = None,
    **kwargs: Any,
) -> float:
    """verl reward function: the outcome reward of one decoded response.

    The grading kind is ``extra_info["kind"]`` when given, ``number`` for a
    ``data_source`` naming GSM8K, else ``auto``. ``ground_truth`` may be the
    answer or ``{"answer": ...}``. A missing ground truth is a data error
    (verl cannot skip a sample), so it raises :class:`UsageError`.

    With ``verifier`` (a backend spec, set through verl's
    ``custom_reward_function.reward_kwargs``) it is the process reward
    instead: the verifier judges the derivation against the problem in
    ``extra_info["problem"]`` (``pacore export-train --format verl`` writes
    it). A sample the verifier could not judge scores 0.0, since verl needs
    a number.
    """
    answer = _answer_of(ground_truth)
    if answer is None:
        raise UsageError(f"compute_score: no ground truth for a sample of {data_source or 'unknown source'}")
    kind = _kind_for(data_source, extra_info)
    if verifier is None:
        return outcome_reward(solution_str, answer, kind)
    problem = (extra_info or {}).get("problem")
    if not isinstance(problem, str) or not problem:
        raise UsageError(
            "compute_score with a verifier needs extra_info['problem'] (export with 'pacore export-train --format verl')"
        )
    judge = shared_verifier(verifier, template=verifier_template, model=verifier_model, cache=verifier_cache)
    (reward,) = process_rewards([problem], [solution_str], [answer], [kind], judge)
    return reward or 0.0


def reward_func(
    prompts: Sequence[Any] | None = None,
    completions: Sequence[Any] | None = None,
    ground_truth: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """TRL ``GRPOTrainer`` reward function: the outcome reward.

    ``completions`` are strings (standard format) or lists of chat messages
    (conversational format; the last message's content is graded).
    ``ground_truth`` is the data set column of that name (an ``answer``
    column is used when there is none); an optional ``kind`` column picks the
    grading kind per sample. Samples without a ground truth get ``None``,
    which TRL skips.
    """
    texts, answers, kinds = _columns(completions, ground_truth, kwargs)
    return [None if a is None else outcome_reward(t, a, k) for t, a, k in zip(texts, answers, kinds, strict=True)]


def make_reward_func(
    reward: RewardName = "outcome",
    *,
    verifier: Verifier | str | None = None,
    verifier_template: str | Path | None = None,
    verifier_model: str | None = None,
    verifier_cache: str | Path | None = None,
) -> TrlRewardFunc:
    """A TRL reward function for ``reward`` (its name shows in TRL's logs as ``rewards/<name>``).

    ``process`` needs ``verifier`` (a :class:`Verifier` or a backend spec);
    the problem each derivation is judged against is the data set's
    ``problem`` column, else the text of the prompt's last user message.
    """
    if reward not in REWARDS:
        raise UsageError(f"unknown reward {reward!r}; expected one of {', '.join(REWARDS)}")
    if reward == "outcome":
        return reward_func
    if verifier is None:
        raise UsageError("the process reward needs a verifier (a backend spec such as http://127.0.0.1:8080/v1)")
    judge = (
        verifier
        if isinstance(verifier, Verifier)
        else shared_verifier(verifier, template=verifier_template, model=verifier_model, cache=verifier_cache)
    )

    def process_reward(
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        ground_truth: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        texts, answers, kinds = _columns(completions, ground_truth, kwargs)
        problems = kwargs.get("problem") or [_prompt_text(p) for p in (prompts or [None] * len(texts))]
        rewards: list[float | None] = [None] * len(texts)
        known = [i for i, a in enumerate(answers) if a is not None]
        scored = process_rewards(
            [problems[i] for i in known], [texts[i] for i in known], [answers[i] for i in known],
            [kinds[i] for i in known], judge,
        )  # fmt: skip
        for i, value in zip(known, scored, strict=True):
            rewards[i] = value
        return rewards

    return process_reward


def _columns(
    completions: Sequence[Any] | None, ground_truth: Sequence[Any] | None, kwargs: dict[str, Any]
) -> tuple[list[str], list[str | None], list[str]]:
    """Completion texts, answers and grading kinds of a TRL batch, checked to line up."""
    completions = list(completions or [])
    truths = ground_truth if ground_truth is not None else kwargs.get("answer")
    if truths is None:
        raise UsageError("reward_func needs a 'ground_truth' (or 'answer') column in the data set")
    truths = list(truths)
    kinds = list(kwargs.get("kind") or ["auto"] * len(completions))
    if not len(truths) == len(kinds) == len(completions):
        raise UsageError(
            f"reward_func got {len(completions)} completions but {len(truths)} ground truths and {len(kinds)} kinds"
        )
    return [_completion_text(c) for c in completions], [_answer_of(t) for t in truths], [k or "auto" for k in kinds]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        return last_user_text([m for m in prompt if isinstance(m, dict)])
    return ""


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
