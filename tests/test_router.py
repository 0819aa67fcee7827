"""Scale-out: RouterBackend sends each call to the least busy endpoint."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from fakes import ScriptedBackend, fail
from harness import fast_backend
from pacore import GenerationParams, asolve, open_backend
from pacore.backends.base import BaseBackend, Completion, Message
from pacore.backends.openai_http import OpenAIBackend
from pacore.backends.router import RouterBackend
from pacore.errors import BackendError, UsageError

PARAMS = GenerationParams()
MESSAGES = [{"role": "user", "content": "q"}]


class HeldBackend(BaseBackend):
    """Each call waits until the test releases it; records the ``n`` it was asked for."""

    def __init__(self, name: str, max_n: int = 8) -> None:
        self.name = self.model = name
        self.max_n = max_n
        self.asked: list[int] = []
        self.release = asyncio.Event()
        self.closed = False

    async def generate(self, messages: Sequence[Message], n: int, params: GenerationParams) -> list[Completion]:
        self.asked.append(n)
        await self.release.wait()
        return [Completion(text=self.name) for _ in range(n)]

    async def aclose(self) -> None:
        self.closed = True


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_idle_members_take_turns() -> None:
    members = [ScriptedBackend(name=f"m{i}") for i in range(3)]
    router = RouterBackend(members)
    for _ in range(6):
        await router.generate(MESSAGES, 1, PARAMS)
    assert [len(m.calls) for m in members] == [2, 2, 2]
    assert router.outstanding == [0, 0, 0]


async def test_calls_go_to_the_member_with_fewest_outstanding_samples() -> None:
    a, b = HeldBackend("a"), HeldBackend("b")
    router = RouterBackend([a, b])
    first = asyncio.create_task(router.generate(MESSAGES, 4, PARAMS))  # a: 4 outstanding
    await settle()
    singles = [asyncio.create_task(router.generate(MESSAGES, 1, PARAMS)) for _ in range(3)]
    await settle()
    # b stays below a's 4 samples for three single calls, whole calls each.
    assert (a.asked, b.asked) == ([4], [1, 1, 1])
    assert router.outstanding == [4, 3]
    b.release.set()
    await asyncio.gather(*singles)
    assert router.outstanding == [4, 0]
    a.release.set()
    assert [c.text for c in await first] == ["a"] * 4
    assert router.outstanding == [0, 0]


async def test_max_n_is_the_smallest_members_and_follows_them() -> None:
    a, b = HeldBackend("a", max_n=16), HeldBackend("b", max_n=4)
    router = RouterBackend([a, b])
    assert router.max_n == 4
    b.max_n = 1  # e.g. an HTTP backend learnt that its server ignores n
    assert router.max_n == 1
    assert router.model == "a"
    assert router.name == "router of 2: a, b"


async def test_a_failed_call_frees_its_member_and_raises() -> None:
    broken = ScriptedBackend(respond=lambda call, i: fail("status"), name="broken")
    router = RouterBackend([broken])
    with pytest.raises(BackendError):
        await router.generate(MESSAGES, 2, PARAMS)
    assert router.outstanding == [0]


async def test_streams_are_routed_too() -> None:
    a, b = ScriptedBackend(name="a"), ScriptedBackend(name="b")
    router = RouterBackend([a, b])
    deltas: list[str] = []
    await router.stream(MESSAGES, PARAMS, lambda content, _: deltas.append(content))
    await router.stream(MESSAGES, PARAMS, lambda content, _: deltas.append(content))
    assert (len(a.calls), len(b.calls)) == (1, 1)
    assert deltas == ["answer 0.0", "answer 0.0"]


async def test_aclose_closes_every_member_even_when_one_fails() -> None:
    class Failing(HeldBackend):
        async def aclose(self) -> None:
            raise OSError("socket already gone")

    a, b, c = HeldBackend("a"), Failing("b"), HeldBackend("c")
    with pytest.raises(OSError, match="already gone"):
        await RouterBackend([a, b, c]).aclose()
    assert a.closed and c.closed


def test_needs_a_member() -> None:
    with pytest.raises(UsageError, match="at least one"):
        RouterBackend([])


async def test_open_backend_takes_a_list_of_specs() -> None:
    single = open_backend(["http://127.0.0.1:9/v1"], model="m")
    assert isinstance(single, OpenAIBackend)
    router = open_backend(["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"], model="m", n_mode="off")
    assert isinstance(router, RouterBackend)
    assert [type(m) for m in router.backends] == [OpenAIBackend, OpenAIBackend]
    assert router.max_n == 1 and router.model == "m"
    await single.aclose()
    await router.aclose()
    with pytest.raises(UsageError, match="unknown backend"):
        open_backend(["http://127.0.0.1:9/v1", "ftp://nowhere"])


@pytest.mark.http
async def test_engine_spreads_a_round_over_real_endpoints() -> None:
    # Calls of 0.5 s: all 8 are still in flight when the last is sent, however loaded the machine.
    with fast_backend("--endpoints", 2, "--ttft-ms", 500, "--completion-tokens", 4) as server:
        backend = open_backend(server.urls, n_mode="off")
        async with backend:
            result = await asolve("q", schedule=[8], backend=backend, params=PARAMS)
        assert result.usage.calls == 9 and result.usage.failed_calls == 0
        served = [s["calls"] for s in server.stats()]
    # Calls still in flight steer new ones away, so a round of 8 splits evenly.
    assert sorted(served) == [4, 5]


@pytest.mark.http
async def test_asolve_takes_a_list_of_backend_specs() -> None:
    with fast_backend("--endpoints", 2, "--completion-tokens", 4) as server:
        result = await asolve("q", schedule=[4], backend=server.urls, params=PARAMS)
        served = [s["samples"] for s in server.stats()]
    assert result.usage.calls == 5 and result.usage.failed_calls == 0
    assert all(samples > 0 for samples in served) and sum(served) == 5
    with pytest.raises(UsageError, match="list of specs"):
        await asolve("q", backend=["http://127.0.0.1:9/v1", 42])


@pytest.mark.http
def test_cli_accepts_several_backends() -> None:
    pacore = Path(sys.executable).parent / "pacore"
    with fast_backend("--endpoints", 2, "--completion-tokens", 4) as server:
        args = [str(pacore), "ask", "q", "--schedule", "4", "-b", server.urls[0], "-b", server.urls[1]]
        process = subprocess.run(args, capture_output=True, text=True, timeout=120)
        served = [s["samples"] for s in server.stats()]
    assert process.returncode == 0, process.stderr
    assert process.stdout.split() == ["the", "answer", "is", "so"]
    assert all(samples > 0 for samples in served) and sum(served) == 5
