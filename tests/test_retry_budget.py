"""The retry policy's backoff bounds and its per-request retry budget."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacore import GenerationParams, asolve
from pacore.backends.base import RetryBudget, RetryPolicy, current_retry_budget
from pacore.backends.openai_http import OpenAIBackend
from pacore.errors import BackendError, RoundFailedError

PARAMS = GenerationParams(max_tokens=4)
MESSAGES = [{"role": "user", "content": "q"}]


@given(
    attempt=st.integers(1, 60),
    retry_after=st.none() | st.floats(-10, 1e6),
    rand=st.floats(0, 1),
    base=st.floats(0.001, 10),
    cap=st.floats(0.01, 100),
)
def test_every_wait_is_between_zero_and_the_cap(attempt, retry_after, rand, base, cap) -> None:
    delay = RetryPolicy(backoff_base=base, backoff_max=cap).delay(attempt, retry_after, rand)
    assert 0 <= delay <= cap
    if retry_after is not None:
        assert delay == min(max(retry_after, 0), cap)  # the server's word, within the cap


def test_the_budget_grows_with_the_calls_made() -> None:
    policy = RetryPolicy(budget_min=2, budget_ratio=0.5)
    budget = RetryBudget()
    assert [budget.spend(policy) for _ in range(3)] == [True, True, False]
    budget.calls = 4  # four calls earn two more retries
    assert [budget.spend(policy) for _ in range(3)] == [True, True, False]


class Unavailable:
    """A server answering 503 to everything; counts the requests."""

    def __init__(self) -> None:
        self.requests = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return httpx.Response(503, json={"error": {"message": "overloaded"}})


def backend(server: Unavailable, policy: RetryPolicy) -> OpenAIBackend:
    return OpenAIBackend("http://test.invalid/v1", model="m", n_mode="off", retry=policy,
                         transport=httpx.MockTransport(server))  # fmt: skip


async def test_a_request_stops_retrying_when_its_budget_is_spent() -> None:
    policy = RetryPolicy(max_attempts=10, backoff_base=0.001, backoff_max=0.001, budget_min=3, budget_ratio=0.5)
    server = Unavailable()
    async with backend(server, policy) as failing:
        with pytest.raises(RoundFailedError) as caught:
            await asolve("q", schedule=[4], backend=failing, params=PARAMS)
        # 4 calls earn 3 + 0.5 * 4 = 5 retries in all, not 4 * 9.
        assert server.requests == 4 + 5
        errors = [t.error for t in caught.value.result.rounds[0].trajectories]
        assert sum("retry budget is spent" in e for e in errors) >= 1
        assert all(t.error_kind == "status" for t in caught.value.result.rounds[0].trajectories)

        # The next request has a budget of its own.
        with pytest.raises(RoundFailedError):
            await asolve("q", schedule=[4], backend=failing, params=PARAMS)
        assert server.requests == 2 * (4 + 5)


async def test_outside_a_request_only_max_attempts_applies() -> None:
    policy = RetryPolicy(max_attempts=5, backoff_base=0.001, backoff_max=0.001, budget_min=0, budget_ratio=0)
    server = Unavailable()
    async with backend(server, policy) as failing:
        assert current_retry_budget.get() is None
        with pytest.raises(BackendError, match="gave up after 5 attempts"):
            await failing.generate(MESSAGES, 1, PARAMS)
    assert server.requests == 5


async def test_the_budget_is_shared_by_concurrent_calls_and_released_after_the_request() -> None:
    policy = RetryPolicy(max_attempts=100, backoff_base=0.001, backoff_max=0.001, budget_min=6, budget_ratio=0)
    server = Unavailable()
    async with backend(server, policy) as failing:
        with pytest.raises(RoundFailedError):
            await asyncio.wait_for(asolve("q", schedule=[8], backend=failing, params=PARAMS), timeout=10)
    assert server.requests == 8 + 6
    assert current_retry_budget.get() is None
