"""Outcome rewards and their verl / TRL adapters."""

from __future__ import annotations

import inspect
import math

import pytest

from pacore.errors import UsageError
from pacore.rewards import compute_score, outcome_reward, par_reward, par_shaped, reward_func


@pytest.mark.parametrize(
    ("response", "truth", "reward"),
    [
        (r"The answer is \boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{3}", "4", 0.0),
        # Reasoning is dropped: a right number inside <think> does not count...
        (r"<think>maybe \boxed{4}? no.</think> The answer is \boxed{3}", "3", 1.0),
        (r"<think>I guess \boxed{4}</think> Answer: 3", "3", 1.0),
        # ...and neither does a response cut off while still thinking.
        (r"<think>so it is \boxed{3} and then", "3", 0.0),
        (r"<think>a</think><think>b \boxed{5}</think>Answer: 6", "6", 1.0),
        ("", "3", 0.0),
        (None, "3", 0.0),
        (r"\boxed{3}", None, 0.0),
    ],
)
def test_outcome_reward(response: str | None, truth: str | None, reward: float) -> None:
    assert outcome_reward(response, truth) == reward


def test_compute_score_has_verls_signature() -> None:
    parameters = list(inspect.signature(compute_score).parameters)
    assert parameters[:4] == ["data_source", "solution_str", "ground_truth", "extra_info"]
    assert inspect.signature(compute_score).parameters["extra_info"].default is None


def test_compute_score_as_verl_calls_it() -> None:
    # verl's reward manager calls it with keywords (extra_info may be absent or None).
    assert compute_score(data_source="openai/gsm8k", solution_str="... #### 1,000", ground_truth="1000") == 1.0
    assert compute_score("openai/gsm8k", "The answer is 72.", "72", None) == 1.0
    assert compute_score("lighteval/MATH", r"\boxed{\dfrac{2}{4}}", r"\frac12", {"index": 3}) == 1.0
    assert compute_score("lighteval/MATH", r"\boxed{\frac{1}{3}}", r"\frac12") == 0.0
    assert compute_score("mmlu", "The answer is (c)", "C", {"kind": "choice"}) == 1.0
    assert compute_score("numbers", "Answer: 7", 7) == 1.0  # parquet columns may hold numbers
    assert compute_score("numbers", "Answer: 7", {"answer": "7"}) == 1.0
    result = compute_score("openai/gsm8k", "#### 5", "5", extra_info=None, sandbox_fusion_url=None)
    assert isinstance(result, float)


def test_compute_score_refuses_a_missing_ground_truth() -> None:
    with pytest.raises(UsageError, match="no ground truth"):
        compute_score("openai/gsm8k", "#### 5", None)


def test_reward_func_with_conversational_completions() -> None:
    prompts = [[{"role": "user", "content": "1/2 as a decimal?"}]] * 3
    completions = [
        [{"role": "assistant", "content": r"<think>half</think>\boxed{0.5}"}],
        [{"role": "assistant", "content": r"\boxed{0.25}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "Answer: 1/2"}]}],
    ]
    truths = [r"\frac{1}{2}"] * 3
    assert reward_func(prompts, completions, truths) == [1.0, 0.0, 1.0]
    # GRPOTrainer passes every column as a keyword, plus its own extras.
    assert reward_func(
        prompts=prompts,
        completions=completions,
        ground_truth=truths,
        completion_ids=[[1], [2], [3]],
        trainer_state=None,
    ) == [1.0, 0.0, 1.0]


def test_reward_func_with_standard_completions_and_columns() -> None:
    completions = ["#### 18", "#### 19", "The answer is (B)", "no answer here"]
    rewards = reward_func(
        prompts=["q1", "q2", "q3", "q4"],
        completions=completions,
        answer=["18", "18", "B", None],
        kind=["number", "number", "choice", None],
    )
    assert rewards == [1.0, 0.0, 1.0, None]  # None: no ground truth, TRL skips the sample


def test_reward_func_checks_its_columns() -> None:
    with pytest.raises(UsageError, match="needs a 'ground_truth'"):
        reward_func(prompts=["q"], completions=["a"])
    with pytest.raises(UsageError, match="2 completions but 1 ground truths"):
        reward_func(prompts=["q", "q"], completions=["a", "b"], ground_truth=["a"])


def test_par_reward_is_the_mean_sigmoid_margin() -> None:
    assert par_reward(1.0, [1.0, 1.0]) == 0.5
    expected = (1 / (1 + math.exp(-1.0)) + 1 / (1 + math.exp(1.0))) / 2  # margins +1 and -1
    assert par_reward(1.0, [0.0, 2.0]) == pytest.approx(expected) == pytest.approx(0.5)
    assert par_reward(2.0, [0.0]) == pytest.approx(1 / (1 + math.exp(-2.0)))
    # Monotone in the score, and strictly inside (0, 1) however far the reward model drifts.
    scores = [-1e6, -50.0, -1.0, 0.0, 1.0, 50.0, 1e6]
    shaped = [par_reward(s, [0.0, 0.5]) for s in scores]
    assert shaped == sorted(shaped)
    assert all(0.0 < value < 1.0 for value in shaped)


def test_par_reward_refuses_bad_input() -> None:
    with pytest.raises(UsageError, match="at least one reference"):
        par_reward(1.0, [])
    with pytest.raises(UsageError, match="finite"):
        par_reward(float("nan"), [0.0])


def test_par_shaped_wraps_a_trl_score_function() -> None:
    def reward_model(prompts=None, completions=None, **kwargs):
        return [float(len(c)) if c != "skip" else None for c in completions]

    shaped = par_shaped(reward_model)
    assert shaped.__name__ == "par_reward_model"
    rewards = shaped(prompts=["p"] * 3, completions=["aa", "a", "skip"], reference_scores=[[2.0], [2.0, 0.0], [1.0]])
    assert rewards[0] == 0.5 and rewards[2] is None
    assert rewards[1] == pytest.approx(par_reward(1.0, [2.0, 0.0]))
    with pytest.raises(UsageError, match="'reference_scores' column"):
        shaped(prompts=["p"], completions=["a"])
