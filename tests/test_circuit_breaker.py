"""The router's circuit breaker and failover: a failing endpoint leaves rotation and is probed back in."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from cli_harness import closed_port_url
from fakes import ScriptedBackend, StreamingScriptedBackend, fail
from harness import fast_backend
from pacore import GenerationParams, asolve
from pacore.backends.base import RetryPolicy
from pacore.backends.openai_http import OpenAIBackend
from pacore.backends.router import BreakerPolicy, RouterBackend
from pacore.errors import BackendError, UsageError

PARAMS = GenerationParams()
MESSAGES = [{"role": "user", "content": "q"}]
POLICY = BreakerPolicy(failures=3, cooldown_s=10.0, max_cooldown_s=25.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Switchable(ScriptedBackend):
    """A member that fails with ``error`` while it is set, else answers."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, model=name)
        self.error: BackendError | None = None
        self.respond = lambda call, i: self.error if self.error is not None else f"{self.name} {call.number}"


def router_of(*names: str) -> tuple[RouterBackend, list[Switchable], Clock]:
    members = [Switchable(name) for name in names]
    clock = Clock()
    return RouterBackend(members, breaker=POLICY, clock=clock), members, clock


async def calls(router: RouterBackend, count: int) -> list[str]:
    return [(await router.generate(MESSAGES, 1, PARAMS))[0].text.split()[0] for _ in range(count)]


async def test_a_member_failing_in_a_row_leaves_rotation_and_its_calls_go_elsewhere() -> None:
    router, (a, b), clock = router_of("a", "b")
    a.error = fail("connect", "a is unreachable")
    # Every call that meets a's failure is taken over by b at once: no call fails.
    assert await calls(router, 6) == ["b"] * 6
    assert len(a.calls) == POLICY.failures  # then a is out of rotation
    assert router.circuit_states() == ["open", "closed"]
    assert await calls(router, 5) == ["b"] * 5 and len(a.calls) == POLICY.failures

    clock.now += POLICY.cooldown_s - 0.1
    await calls(router, 3)
    assert len(a.calls) == POLICY.failures and router.circuit_states() == ["open", "closed"]


async def test_after_the_cool_down_one_probe_goes_and_a_success_brings_it_back() -> None:
    router, (a, b), clock = router_of("a", "b")
    a.error = fail("timeout", "a did not answer")
    await calls(router, POLICY.failures * 2)
    clock.now += POLICY.cooldown_s
    assert router.circuit_states() == ["half-open", "closed"]

    a.error = None
    a.gate = threading.Event()  # the probe is held in flight while other calls arrive
    probe = asyncio.create_task(router.generate(MESSAGES, 1, PARAMS))
    for _ in range(100):
        if len(a.calls) == POLICY.failures + 1:
            break
        await asyncio.sleep(0)
    assert len(a.calls) == POLICY.failures + 1
    assert await calls(router, 4) == ["b"] * 4  # no second call while the probe runs
    a.gate.set()
    assert (await probe)[0].text.startswith("a ")
    assert router.circuit_states() == ["closed", "closed"]
    assert sorted(await calls(router, 4)) == ["a", "a", "b", "b"]  # back in turn


async def test_a_failed_probe_doubles_the_cool_down_up_to_its_cap() -> None:
    router, (a, b), clock = router_of("a", "b")
    a.error = fail("status", "HTTP 503")
    await calls(router, POLICY.failures * 2)
    for cooldown in (20.0, 25.0, 25.0):  # 10 doubled, then capped at 25
        clock.now += 1000
        before = len(a.calls)
        assert await calls(router, 2) == ["b", "b"]
        assert len(a.calls) == before + 1  # one probe, failed over to b
        clock.now += cooldown - 0.1
        await calls(router, 2)
        assert len(a.calls) == before + 1 and router.circuit_states()[0] == "open"
    a.error = None
    clock.now += 25.0
    await calls(router, 1)
    assert router.circuit_states() == ["closed", "closed"]
    # Closed again with the first cool-down: 3 failures open it for 10 s.
    a.error = fail("connect", "gone")
    await calls(router, POLICY.failures * 2)
    clock.now += POLICY.cooldown_s
    assert router.circuit_states()[0] == "half-open"


async def test_only_unreachable_timeouts_and_5xx_count_and_a_success_resets_the_count() -> None:
    router, (a, b), clock = router_of("a", "b")
    too_many = BackendError("HTTP 429", kind="status", status_code=429)
    for error in (too_many, fail("protocol", "bad JSON")):
        a.error = error
        await calls(router, 8)
    assert router.circuit_states() == ["closed", "closed"]
    # Two failures, a success, two failures: four in all, but never three in a row.
    for error in (BackendError("HTTP 503", kind="status", status_code=503), None, fail("connect", "gone")):
        a.error = error
        seen = len(a.calls)
        while len(a.calls) < seen + (1 if error is None else 2):
            await calls(router, 1)
    assert router.circuit_states() == ["closed", "closed"]
    await calls(router, 2)
    assert router.circuit_states() == ["open", "closed"]


async def test_fatal_errors_are_raised_not_failed_over() -> None:
    router, (a, b), _ = router_of("a", "b")
    a.error = fail("auth", "HTTP 401")
    with pytest.raises(BackendError, match="401"):
        await calls(router, 2)
    assert len(b.calls) <= 1 and router.circuit_states() == ["closed", "closed"]


async def test_with_every_member_out_of_rotation_calls_still_go_to_the_one_due_back_first() -> None:
    router, (a, b), clock = router_of("a", "b")
    a.error = fail("connect", "a is gone")
    await calls(router, POLICY.failures * 2)  # a opens, due back at 110
    clock.now += 5
    b.error = fail("connect", "b is gone")
    for _ in range(POLICY.failures):  # nowhere to fail over to: the calls fail
        with pytest.raises(BackendError, match="b is gone"):
            await router.generate(MESSAGES, 1, PARAMS)
    assert router.circuit_states() == ["open", "open"]  # b due back at 115

    clock.now += 1
    with pytest.raises(BackendError, match="a is gone"):  # tried, not refused
        await router.generate(MESSAGES, 1, PARAMS)
    # That failed probe put a back for 20 s (at 126), so b (115) is now due first.
    b.error = None
    assert await calls(router, 1) == ["b"]
    assert router.circuit_states() == ["open", "closed"]


async def test_a_stream_fails_over_only_before_its_first_delta() -> None:
    class BreaksMidStream(StreamingScriptedBackend):
        async def stream(self, messages, params, on_delta):
            on_delta("partial ", "")
            raise fail("protocol", "stream cut")

    broken = BreaksMidStream(name="broken")
    healthy = StreamingScriptedBackend(name="healthy")
    deltas: list[str] = []
    router = RouterBackend([broken, healthy])
    with pytest.raises(BackendError, match="stream cut"):
        await router.stream(MESSAGES, PARAMS, lambda content, _: deltas.append(content))
    assert deltas == ["partial "] and not healthy.calls

    refusing = StreamingScriptedBackend(respond=lambda call, i: fail("status", "HTTP 503"), name="refusing")
    router = RouterBackend([refusing, healthy])
    deltas.clear()
    completion = await router.stream(MESSAGES, PARAMS, lambda content, _: deltas.append(content))
    assert completion.ok and "".join(deltas) == completion.text and len(healthy.calls) == 1


async def test_the_member_skips_its_own_retries_when_another_endpoint_can_take_the_call() -> None:
    attempts: list[int] = []

    def always_503(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        return httpx.Response(503, json={"error": {"message": "overloaded"}})

    # A slow backoff: retrying on the same endpoint would take seconds.
    slow = RetryPolicy(max_attempts=4, backoff_base=5.0, backoff_max=5.0)
    failing = OpenAIBackend("http://test.invalid/v1", model="m", retry=slow, transport=httpx.MockTransport(always_503))
    healthy = ScriptedBackend(name="healthy")
    async with RouterBackend([failing, healthy]) as router:
        (completion,) = await asyncio.wait_for(router.generate(MESSAGES, 1, PARAMS), timeout=10)
    assert completion.text == "answer 0.0" and len(attempts) == 1
    assert completion.failed_attempts == ("status 503",)  # the failed-over attempt is on record

    # Alone, the same member retries as its policy says.
    fast = RetryPolicy(max_attempts=3, backoff_base=0.001)
    attempts.clear()
    alone = OpenAIBackend("http://test.invalid/v1", model="m", retry=fast, transport=httpx.MockTransport(always_503))
    async with RouterBackend([alone]) as router:
        with pytest.raises(BackendError, match="gave up after 3 attempts"):
            await router.generate(MESSAGES, 1, PARAMS)
    assert len(attempts) == 3


def test_breaker_policy_is_validated() -> None:
    with pytest.raises(UsageError):
        BreakerPolicy(failures=0)
    with pytest.raises(UsageError):
        BreakerPolicy(cooldown_s=10, max_cooldown_s=5)


@pytest.mark.http
async def test_real_endpoints_one_down_one_failing_one_healthy() -> None:
    """A port where nothing listens, an endpoint answering 503 to everything, and a healthy one."""
    with (
        fast_backend("--faults", "503:1", "--completion-tokens", 3) as failing,
        fast_backend("--completion-tokens", 3) as healthy,
    ):
        urls = [closed_port_url(), failing.url, healthy.url]
        members = [OpenAIBackend(url, model="fast", n_mode="off") for url in urls]
        async with RouterBackend(members, breaker=BreakerPolicy(failures=POLICY.failures, cooldown_s=60)) as router:
            results = [await asolve("q", schedule=[4], backend=router, params=PARAMS) for _ in range(5)]
            states = router.circuit_states()
        failing_calls = failing.stats()[0]["faults"]["503"]
        assert healthy.stats()[0]["calls"] == 25
    assert all(r.usage.failed_calls == 0 and r.answer == "the answer is" for r in results)
    assert states == ["open", "open", "closed"]
    failed_over = [a for r in results for rnd in r.rounds for t in rnd.trajectories for a in t.failed_attempts]
    assert failed_over.count("status 503") == failing_calls
    assert failed_over.count("connect") >= POLICY.failures
    # Calls in flight when the breaker opened may fail there too, but then none.
    assert POLICY.failures <= failing_calls <= 4 + POLICY.failures
