"""Kept for compatibility: the rewards live in :mod:`pacore.eval.rewards`.

``pacore.rewards`` was their first home; the verl recipe (recipes/verl), the
training docs and users' scripts name it, so it stays importable with the same
names, and this file stays a valid verl ``custom_reward_function.path``.
"""

from pacore.eval.rewards import (
    REWARDS,
    RewardName,
    TrlRewardFunc,
    compute_score,
    make_reward_func,
    outcome_reward,
    par_reward,
    par_shaped,
    process_rewards,
    reward_func,
    shared_verifier,
)

__all__ = [
    "REWARDS", "RewardName", "TrlRewardFunc", "compute_score", "make_reward_func", "outcome_reward",
    "par_reward", "par_shaped", "process_rewards", "reward_func", "shared_verifier",
]  # fmt: skip
