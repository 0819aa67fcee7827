"""The engine against the method spec (PACORE_METHOD.md), on the scripted backend."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
from contextlib import aclosing
from dataclasses import dataclass, field

import pytest

import pacore
from fakes import Call, ScriptedBackend, StreamingScriptedBackend, fail
from pacore.api import iter_solve, solve
from pacore.backends.base import Completion, GenerationParams
from pacore.engine import PROGRESS_INTERVAL_S, _call_seed, asolve
from pacore.errors import (
    BackendError,
    DeadlineExceededError,
    InputError,
    RoundFailedError,
    UsageError,
)
from pacore.schedule import MAX_TRAJECTORIES_PER_ROUND
from pacore.trace import (
    AnswerDelta,
    Final,
    Result,
    RoundFinished,
    RoundStarted,
    Trajectory,
    TrajectoryFinished,
    TrajectoryProgress,
)

SYNTHESIS_MARK = "Reference Responses"


def is_synthesis(call: Call) -> bool:
    return SYNTHESIS_MARK in call.last_user_text


def first_round_replies(reply):
    """A responder: ``reply(call, i)`` in round 1, ``"final answer"`` in synthesis rounds."""
    return lambda call, i: "final answer" if is_synthesis(call) else reply(call, i)


def shown_order(prompt: str, messages: list[str]) -> list[str]:
    """The messages in the order the synthesis prompt shows them."""
    return sorted((m for m in messages if m in prompt), key=prompt.index)


# --- round structure ---------------------------------------------------------


async def test_schedule_4_runs_four_trajectories_then_one_synthesis():
    backend = ScriptedBackend()
    result = await asolve("What is 2+2?", schedule=[4], backend=backend)
    assert [c.n for c in backend.calls] == [1, 1, 1, 1, 1]
    assert [(r.index, r.k, r.final) for r in result.rounds] == [(0, 4, False), (1, 1, True)]
    assert [t.index for t in result.rounds[0].trajectories] == [0, 1, 2, 3]
    assert result.answer == "answer 4.0"
    assert result.final is not None and result.final.text == "answer 4.0"
    assert result.schedule == [4]
    assert (result.model, result.backend) == ("scripted", "scripted")


async def test_schedule_32_4_runs_three_rounds():
    backend = ScriptedBackend()
    result = await asolve("Q", schedule="32,4", backend=backend)
    assert [r.k for r in result.rounds] == [32, 4, 1]
    assert [len(r.trajectories) for r in result.rounds] == [32, 4, 1]
    assert len(backend.calls) == 37
    # Round 3 synthesizes round 2's four messages, not round 1's 32.
    assert sorted(i for _, i in result.rounds[2].references) == [0, 1, 2, 3]
    assert {r for r, _ in result.rounds[2].references} == {1}
    assert len(result.rounds[1].references) == 32


@pytest.mark.parametrize("off", ["off", [], "[]"])
async def test_empty_schedule_is_a_single_pass_through_call(off):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello?"},
    ]
    backend = ScriptedBackend(respond=lambda call, i: "<think>hmm</think> Hi!")
    result = await asolve(conversation, schedule=off, backend=backend)
    assert len(backend.calls) == 1
    assert backend.calls[0].messages == conversation
    assert [(r.k, r.final) for r in result.rounds] == [(1, True)]
    assert result.answer == "Hi!"
    assert result.rounds[0].references == []


async def test_trajectories_are_sorted_by_index_whatever_order_they_finish():
    # Later calls finish first.
    backend = ScriptedBackend(delay=lambda call: 0.02 * (4 - call.number) if call.number < 4 else 0)
    finished: list[int] = []

    def on_event(event):
        if isinstance(event, TrajectoryFinished) and event.round == 0:
            finished.append(event.trajectory.index)

    result = await asolve("Q", schedule=[4], backend=backend, on_event=on_event)
    assert finished == [3, 2, 1, 0]
    assert [t.index for t in result.rounds[0].trajectories] == [0, 1, 2, 3]
    assert [t.text for t in result.rounds[0].trajectories] == [f"answer {i}.0" for i in range(4)]


@pytest.mark.parametrize(
    ("max_n", "schedule", "ns"),
    [
        (3, [7, 4], [3, 3, 1, 3, 1, 1]),
        (4, [8], [4, 4, 1]),
        (16, [7, 2], [7, 2, 1]),
        (1, [3], [1, 1, 1, 1]),
    ],
)
async def test_max_n_splits_rounds_into_batched_calls(max_n, schedule, ns):
    backend = ScriptedBackend(max_n=max_n)
    result = await asolve("Q", schedule=schedule, backend=backend)
    assert [c.n for c in backend.calls] == ns
    assert backend.trajectories_requested == sum(schedule) + 1
    for rnd in result.rounds:
        assert [t.index for t in rnd.trajectories] == list(range(rnd.k))
        assert len({t.text for t in rnd.trajectories}) == rnd.k  # every sample recorded once


async def test_samples_missing_from_a_call_are_recorded_as_failures():
    class IgnoresN(ScriptedBackend):
        async def generate(self, messages, n, params):
            return (await super().generate(messages, n, params))[:1]

    backend = IgnoresN(max_n=4)
    result = await asolve("Q", schedule=[4], backend=backend)
    first = result.rounds[0].trajectories
    assert [t.ok for t in first] == [True, False, False, False]
    assert {t.error_kind for t in first[1:]} == {"protocol"}
    assert "returned 1 of 4" in (first[1].error or "")
    assert len(result.rounds[1].references) == 1


# --- round 1 and synthesis ---------------------------------------------------

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def rich_conversation():
    return [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "Earlier question"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "tool output 42"},
        {"role": "assistant", "content": "Earlier answer"},
        {
            "role": "user",
            "name": "alice",
            "content": [
                {"type": "text", "text": "How many sheep"},
                IMAGE,
                {"type": "text", "text": "are in the picture?"},
            ],
        },
    ]


async def test_round_one_sends_the_conversation_unchanged():
    conversation = rich_conversation()
    before = copy.deepcopy(conversation)
    backend = ScriptedBackend()
    await asolve(conversation, schedule=[3], backend=backend)
    for call in backend.calls[:3]:
        assert call.messages == before
    assert conversation == before  # the caller's list is never mutated


async def test_synthesis_replaces_only_the_last_user_message_and_keeps_images():
    conversation = rich_conversation()
    backend = ScriptedBackend()
    await asolve(conversation, schedule=[2, 2], backend=backend)
    synthesis_calls = backend.calls[2:]
    assert len(synthesis_calls) == 3  # rounds 2 and 3
    for call in synthesis_calls:
        assert call.messages[:-1] == conversation[:-1]
        last = call.messages[-1]
        assert last["role"] == "user" and last["name"] == "alice"
        text_part, *rest = last["content"]
        assert text_part["type"] == "text" and SYNTHESIS_MARK in text_part["text"]
        assert rest == [IMAGE]
        assert "How many sheep\nare in the picture?" in text_part["text"]


async def test_messages_after_the_last_user_turn_stay():
    conversation = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "Answer: "},  # an assistant prefill
    ]
    backend = ScriptedBackend()
    await asolve(conversation, schedule=[1], backend=backend)
    synthesis = backend.calls[-1].messages
    assert synthesis[1] == conversation[1]
    assert synthesis[0]["content"].startswith("You are given a problem")


async def test_a_plain_string_message_stays_a_string():
    backend = ScriptedBackend()
    await asolve([{"role": "user", "content": "Plain question"}], schedule=[2], backend=backend)
    content = backend.calls[-1].messages[-1]["content"]
    assert isinstance(content, str) and SYNTHESIS_MARK in content


async def test_synthesis_prompt_holds_problem_and_each_message_once_numbered():
    problem = "Compute the zeta-token problem"
    messages = [f"conclusion-{i}-xyz" for i in range(5)]
    backend = ScriptedBackend(respond=first_round_replies(lambda call, i: messages[call.number]))
    result = await asolve(problem, schedule=[5], backend=backend, seed=3)
    prompt = backend.calls[-1].last_user_text
    assert prompt.count(problem) == 1
    for message in messages:
        assert prompt.count(message) == 1
    shown = shown_order(prompt, messages)
    for number, message in enumerate(shown, start=1):
        assert re.search(rf"Reference {number}:\s*{message}", prompt)
    assert "Reference 6:" not in prompt
    assert [messages[i] for _, i in result.rounds[1].references] == shown


async def test_compaction_keeps_reasoning_and_thinking_out_of_the_next_round():
    def reply(call, i):
        return Completion(
            text=f"<think>draft SCRATCH{call.number}</think>early</think> Final {call.number}",
            reasoning=f"SECRET reasoning {call.number}",
            completion_tokens=5,
        )

    backend = ScriptedBackend(respond=first_round_replies(reply))
    result = await asolve("Q", schedule=[3], backend=backend)
    sent = json.dumps(backend.calls[-1].messages)
    for i in range(3):
        assert f"Final {i}" in sent
    for leaked in ("SECRET", "SCRATCH", "</think>", "early"):
        assert leaked not in sent
    # The trace keeps what was dropped.
    first = result.rounds[0].trajectories[0]
    assert first.reasoning == "SECRET reasoning 0" and "SCRATCH0" in first.text
    assert first.message == " Final 0"  # unstripped: the bytes after the last </think>


async def test_empty_and_failed_trajectories_contribute_no_message():
    replies = {
        0: "kept-A",
        1: "   \n ",
        2: "",
        3: "<think>only thinking</think>  ",
        4: Completion(text="PARTIAL-TEXT", error="stream broke", error_kind="protocol"),
        5: "kept-B",
    }
    backend = ScriptedBackend(respond=first_round_replies(lambda call, i: replies[call.number]))
    result = await asolve("Q", schedule=[6], backend=backend)
    prompt = backend.calls[-1].last_user_text
    assert sorted(i for _, i in result.rounds[1].references) == [0, 5]
    assert "kept-A" in prompt and "kept-B" in prompt
    assert "PARTIAL-TEXT" not in prompt and "only thinking" not in prompt
    assert "Reference 3:" not in prompt
    assert [t.message for t in result.rounds[0].trajectories][1:5] == [None] * 4


# --- shuffle and seeds -------------------------------------------------------


async def reference_order(seed: int, k: int = 6) -> list[tuple[int, int]]:
    backend = ScriptedBackend(respond=first_round_replies(lambda call, i: f"msg-{call.number}"))
    result = await asolve("Q", schedule=[k], backend=backend, seed=seed)
    prompt = backend.calls[-1].last_user_text
    shown = shown_order(prompt, [f"msg-{i}" for i in range(k)])
    # Round.references records the order the model was shown.
    assert [f"msg-{i}" for _, i in result.rounds[1].references] == shown
    assert result.seed == seed
    return result.rounds[1].references


async def test_shuffle_is_reproducible_for_a_seed():
    assert await reference_order(11) == await reference_order(11)


async def test_different_seeds_give_different_orders():
    orders = {tuple(await reference_order(seed)) for seed in range(6)}
    assert len(orders) > 1
    assert any(list(order) != sorted(order) for order in orders)  # not always positional


async def test_shuffle_seed_defaults_to_the_sampling_seed():
    backend = ScriptedBackend()
    result = await asolve("Q", schedule=[2], backend=backend, params=GenerationParams(seed=9))
    assert result.seed == 9


def call_seeds(backend: ScriptedBackend) -> list[int | None]:
    return [c.params.seed for c in backend.calls]


@pytest.mark.parametrize("max_n", [1, 2])
async def test_each_call_gets_its_own_reproducible_seed(max_n):
    params = GenerationParams(seed=7, temperature=0.5)
    runs = []
    for _ in range(2):
        backend = ScriptedBackend(max_n=max_n)
        await asolve("Q", schedule=[4, 3], backend=backend, params=params)
        runs.append(call_seeds(backend))
        assert all(c.params.temperature == 0.5 for c in backend.calls)
    assert runs[0] == runs[1]
    assert None not in runs[0] and len(set(runs[0])) == len(runs[0])
    other = ScriptedBackend(max_n=max_n)
    await asolve("Q", schedule=[4, 3], backend=other, params=GenerationParams(seed=8))
    assert call_seeds(other) != runs[0]


async def test_without_a_seed_no_seed_is_sent():
    backend = ScriptedBackend()
    await asolve("Q", schedule=[3], backend=backend, seed=5)  # shuffle seed only
    assert call_seeds(backend) == [None] * 4


async def test_streamed_final_call_gets_the_same_seed_as_a_plain_one():
    plain, streamed = ScriptedBackend(), StreamingScriptedBackend()
    params = GenerationParams(seed=1)
    await asolve("Q", schedule=[2], backend=plain, params=params)
    await asolve("Q", schedule=[2], backend=streamed, params=params, stream_answer=True)
    assert call_seeds(plain) == call_seeds(streamed)


@pytest.mark.parametrize("seed", [0, 2**40 + 3])
def test_no_two_calls_of_a_request_share_a_seed(seed):
    # Every (round, first index) a request of three maximal rounds can use.
    calls = [(r, first) for r in range(3) for first in range(MAX_TRAJECTORIES_PER_ROUND)]
    assert len({_call_seed(seed, r, first) for r, first in calls}) == len(calls)


# --- failures ----------------------------------------------------------------


async def test_partial_failures_are_recorded_and_the_round_goes_on():
    def reply(call, i):
        if is_synthesis(call):
            return "final answer"
        if call.number == 1:
            return Completion(text="", error="sample failed", error_kind="protocol")
        if call.number == 2:
            return fail("status", "HTTP 503 from backend")
        return f"ok {call.number}"

    backend = ScriptedBackend(respond=reply)
    result = await asolve("Q", schedule=[4], backend=backend)
    first = result.rounds[0]
    assert [t.ok for t in first.trajectories] == [True, False, False, True]
    assert (first.trajectories[1].error, first.trajectories[1].error_kind) == ("sample failed", "protocol")
    assert (first.trajectories[2].error, first.trajectories[2].error_kind) == (
        "HTTP 503 from backend",
        "status",
    )
    assert result.answer == "final answer" and result.error is None
    assert (first.succeeded, first.failed) == (2, 2)
    assert result.usage.failed_calls == 2 and result.usage.calls == 5


async def test_a_failed_batched_call_fails_all_its_samples():
    backend = ScriptedBackend(
        max_n=2,
        respond=first_round_replies(lambda call, i: fail("timeout") if call.number == 0 else "ok"),
    )
    result = await asolve("Q", schedule=[4], backend=backend)
    assert [t.error_kind for t in result.rounds[0].trajectories] == ["timeout", "timeout", None, None]


async def test_all_trajectories_failing_raises_with_the_partial_trace():
    events = []
    backend = ScriptedBackend(respond=lambda call, i: fail("connect", "connection refused"))
    with pytest.raises(RoundFailedError) as caught:
        await asolve("Q", schedule=[4], backend=backend, on_event=events.append)
    exc = caught.value
    assert "round 1: all 4 trajectories failed: connection refused" in str(exc)
    assert exc.result is not None and exc.result.error == str(exc)
    assert len(exc.result.rounds) == 1 and exc.result.rounds[0].failed == 4
    assert isinstance(events[-1], Final) and events[-1].result.error == str(exc)
    assert len(backend.calls) == 4  # no synthesis was attempted


async def test_a_failed_final_call_keeps_the_earlier_rounds():
    backend = ScriptedBackend(respond=lambda call, i: fail("timeout", "read timed out") if is_synthesis(call) else "ok")
    with pytest.raises(RoundFailedError, match="final round: the call failed: read timed out") as caught:
        await asolve("Q", schedule=[3], backend=backend)
    result = caught.value.result
    assert [r.succeeded for r in result.rounds] == [3, 0]
    assert result.usage.calls == 4 and result.answer == ""


async def test_a_fatal_error_aborts_at_once_and_cancels_sibling_calls():
    # The siblings never answer on their own (an hour): only the fatal error can end the request.
    backend = ScriptedBackend(
        delay=lambda call: 0 if call.number == 0 else 3600,
        respond=lambda call, i: fail("auth", "HTTP 401: invalid API key"),
    )
    events = []
    with pytest.raises(BackendError) as caught:
        await asyncio.wait_for(asolve("Q", schedule=[4], backend=backend, on_event=events.append), timeout=120)
    assert caught.value.kind == "auth" and "invalid API key" in str(caught.value)
    assert sorted(c.number for c in backend.cancelled) == [1, 2, 3]
    assert caught.value.result is not None and caught.value.result.error
    assert isinstance(events[-1], Final)


async def test_a_fatal_error_in_a_later_round_keeps_round_one():
    backend = ScriptedBackend(respond=lambda call, i: fail("not_found", "model gone") if is_synthesis(call) else "ok")
    with pytest.raises(BackendError) as caught:
        await asolve("Q", schedule=[3, 2], backend=backend)
    result = caught.value.result
    assert result.rounds[0].succeeded == 3 and len(result.rounds) == 2
    assert len(backend.calls) == 5  # round 2 started both calls; the final round never ran


@pytest.mark.parametrize(("min_success", "passes"), [(0.5, True), (0.75, False), (1.0, False)])
async def test_min_success_is_enforced(min_success, passes):
    backend = ScriptedBackend(respond=first_round_replies(lambda call, i: fail() if call.number in (0, 1) else "ok"))
    if passes:
        result = await asolve("Q", schedule=[4], backend=backend, min_success=min_success)
        assert result.answer == "final answer"
        return
    with pytest.raises(RoundFailedError, match=r"only 2 of 4 trajectories succeeded, \d required"):
        await asolve("Q", schedule=[4], backend=backend, min_success=min_success)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5])
async def test_min_success_must_be_a_fraction(bad):
    with pytest.raises(UsageError, match="min_success"):
        await asolve("Q", backend=ScriptedBackend(), min_success=bad)


async def test_a_round_where_every_trajectory_is_empty_bypasses_the_template():
    # The report's degenerate case: no message, so the original problem is sent as is.
    backend = ScriptedBackend(respond=lambda call, i: ["", "  ", "<think>x</think>", "done"][call.number])
    result = await asolve("Q", schedule=[3], backend=backend)
    assert len(backend.calls) == 4
    assert backend.calls[-1].messages == [{"role": "user", "content": "Q"}]
    assert result.rounds[0].succeeded == 3 and result.rounds[1].bypassed
    assert result.answer == "done"


async def test_deadline_raises_with_the_partial_result_and_cancels_calls():
    # The synthesis call never answers on its own (an hour): only the deadline can end the request.
    # Round 1 answers at once; the deadline leaves it 2 s, so a loaded machine's pause cannot end it there.
    backend = ScriptedBackend(delay=lambda call: 3600 if is_synthesis(call) else 0)
    with pytest.raises(DeadlineExceededError, match=r"deadline of 2s exceeded in round 2 of 2") as caught:
        await asyncio.wait_for(asolve("Q", schedule=[2], backend=backend, deadline=2.0), timeout=120)
    result = caught.value.result
    assert result.rounds[0].succeeded == 2 and result.rounds[1].trajectories == []
    assert len(backend.cancelled) == 1
    assert isinstance(caught.value, RoundFailedError)


async def test_a_backend_timeout_is_not_mistaken_for_the_deadline():
    backend = ScriptedBackend(respond=lambda call, i: TimeoutError("backend's own timeout"))
    with pytest.raises(TimeoutError, match="backend's own") as caught:
        await asolve("Q", schedule=[1], backend=backend, deadline=60)
    assert not isinstance(caught.value, DeadlineExceededError)


@pytest.mark.parametrize("bad", [0, -1])
async def test_deadline_must_be_positive(bad):
    with pytest.raises(UsageError, match="deadline"):
        await asolve("Q", backend=ScriptedBackend(), deadline=bad)


# --- accounting --------------------------------------------------------------


async def test_usage_sums_every_trajectory_of_every_round():
    def reply(call, i):
        if call.number == 5:
            return Completion(text="", error="boom", error_kind="status", prompt_tokens=3)
        return Completion(
            text=f"t{call.number}",
            prompt_tokens=100 + call.number,
            completion_tokens=10 * (call.number + 1),
        )

    backend = ScriptedBackend(respond=reply)
    result = await asolve("Q", schedule=[3, 3], backend=backend)
    numbers = range(7)
    assert result.usage.completion_tokens == sum(10 * (n + 1) for n in numbers if n != 5)
    assert result.usage.prompt_tokens == sum(100 + n for n in numbers if n != 5) + 3
    assert (result.usage.calls, result.usage.failed_calls) == (7, 1)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert sum(r.completion_tokens for r in result.rounds) == result.usage.completion_tokens


# --- events ------------------------------------------------------------------


def describe(events) -> list[str]:
    out = []
    for event in events:
        if isinstance(event, RoundStarted):
            out.append(f"start {event.round} k={event.k} final={event.final} of {event.total_rounds}")
        elif isinstance(event, TrajectoryFinished):
            out.append(f"traj {event.round} {event.done}/{event.k}")
        elif isinstance(event, RoundFinished):
            out.append(f"end {event.round.index} n={len(event.round.trajectories)}")
        elif isinstance(event, AnswerDelta):
            out.append(f"delta {event.content!r}")
        elif isinstance(event, Final):
            out.append(f"final error={event.result.error}")
    return out  # TrajectoryProgress events are checked on their own below


EXPECTED_EVENTS = [
    "start 0 k=3 final=False of 2",
    "traj 0 1/3",
    "traj 0 2/3",
    "traj 0 3/3",
    "end 0 n=3",
    "start 1 k=1 final=True of 2",
    "traj 1 1/1",
    "end 1 n=1",
    "final error=None",
]


async def test_events_come_in_order_with_done_counters():
    events = []
    result = await asolve("Q", schedule=[3], backend=ScriptedBackend(), on_event=events.append)
    assert describe(events) == EXPECTED_EVENTS
    assert events[-1].result == result


async def test_iter_solve_yields_the_same_events():
    events = [e async for e in iter_solve("Q", schedule=[3], backend=ScriptedBackend())]
    assert describe(events) == EXPECTED_EVENTS
    assert events[-1].result.answer == "answer 3.0"


@dataclass
class SlowlyStreaming(ScriptedBackend):
    """Samples of ``tokens`` words, one word every ``pause`` seconds, reported to ``on_progress``."""

    tokens: int = 60
    pause: float = 0.01
    #: The ``on_progress`` of each call.
    callbacks: list = field(default_factory=list)

    async def generate(self, messages, n, params, on_progress=None):
        self.calls.append(Call(list(messages), n, params, len(self.calls)))
        self.callbacks.append(on_progress)
        for count in range(1, self.tokens + 1):
            await asyncio.sleep(self.pause)
            for i in range(n):
                if on_progress is not None:
                    on_progress(i, count)
        return [Completion(text="w " * self.tokens, completion_tokens=self.tokens) for _ in range(n)]


async def test_progress_events_report_live_tokens_at_a_throttled_rate():
    backend = SlowlyStreaming(max_n=2)
    events = []
    started = time.monotonic()
    await asolve("Q", schedule=[4], backend=backend, on_event=events.append)
    elapsed = time.monotonic() - started
    progress = [e for e in events if isinstance(e, TrajectoryProgress)]
    # 5 trajectories of 60 tokens streamed over about 0.6 s per round: a few events, not 300. Each
    # round reports at once, then at most every PROGRESS_INTERVAL_S (more on a loaded machine's slower run).
    assert 2 <= len(progress) <= 2 + elapsed / PROGRESS_INTERVAL_S
    first_round = [e for e in progress if e.round == 0]
    assert first_round and {e.round for e in progress} == {0, 1}
    assert all(set(e.tokens) <= {0, 1, 2, 3} and all(0 < t <= 60 for t in e.tokens.values()) for e in first_round)
    # Counts grow, and no trajectory is reported after it finished.
    finished: set[tuple[int, int]] = set()
    seen: dict[tuple[int, int], int] = {}
    for event in events:
        if isinstance(event, TrajectoryFinished):
            finished.add((event.round, event.trajectory.index))
        elif isinstance(event, TrajectoryProgress):
            for index, tokens in event.tokens.items():
                key = (event.round, index)
                assert key not in finished and tokens >= seen.get(key, 0)
                seen[key] = tokens
    # The events round-trip through JSON like every other event.
    assert TrajectoryProgress.model_validate_json(progress[0].model_dump_json()) == progress[0]


async def test_backends_written_before_progress_are_called_without_it():
    class OldStyle(ScriptedBackend):
        async def generate(self, messages, n, params):
            return await super().generate(messages, n, params)

    events = []
    result = await asolve("Q", schedule=[2], backend=OldStyle(), on_event=events.append)
    assert result.answer and not any(isinstance(e, TrajectoryProgress) for e in events)
    # Without an event consumer, no backend is asked for progress at all.
    backend = SlowlyStreaming(tokens=3)
    await asolve("Q", schedule=[2], backend=backend)
    assert len(backend.calls) == 3 and backend.callbacks == [None, None, None]


async def test_iter_solve_raises_after_the_final_event():
    events = []
    with pytest.raises(RoundFailedError, match="all 2 trajectories failed"):
        backend = ScriptedBackend(respond=lambda call, i: fail())
        async for event in iter_solve("Q", schedule=[2], backend=backend):
            events.append(event)
    assert isinstance(events[-1], Final) and "all 2 trajectories failed" in events[-1].result.error
    assert events[-1].result.rounds[0].failed == 2


async def test_iter_solve_raises_input_errors_without_events():
    with pytest.raises(InputError):
        async for _ in iter_solve("  ", backend=ScriptedBackend()):
            pytest.fail("no event expected")


async def test_closing_iter_solve_early_cancels_backend_calls():
    backend = ScriptedBackend(delay=3600)  # calls that never answer on their own
    async with aclosing(iter_solve("Q", schedule=[3], backend=backend)) as events:
        async for event in events:
            assert isinstance(event, RoundStarted)
            for _ in range(3000):  # let the round's calls start (30 s at most)
                if len(backend.calls) == 3:
                    break
                await asyncio.sleep(0.01)
            break
    assert len(backend.cancelled) == 3


async def test_stream_answer_streams_only_the_final_round():
    final_text = "The final, synthesized answer."
    backend = StreamingScriptedBackend(
        respond=lambda call, i: final_text if is_synthesis(call) else "<think>t</think>draft"
    )
    events = []
    result = await asolve("Q", schedule=[2], backend=backend, stream_answer=True, on_event=events.append)
    kinds = describe(events)
    first_delta = next(i for i, k in enumerate(kinds) if k.startswith("delta"))
    assert kinds[:first_delta] == [
        "start 0 k=2 final=False of 2",
        "traj 0 1/2",
        "traj 0 2/2",
        "end 0 n=2",
        "start 1 k=1 final=True of 2",
    ]
    deltas = [e for e in events if isinstance(e, AnswerDelta)]
    assert len(deltas) > 1 and "".join(d.content for d in deltas) == final_text
    assert kinds[first_delta + len(deltas) :] == ["traj 1 1/1", "end 1 n=1", "final error=None"]
    assert backend.streamed == [backend.calls[-1]] and result.answer == final_text


async def test_stream_answer_works_with_a_backend_that_cannot_stream():
    backend = ScriptedBackend()  # BaseBackend.stream: one delta with the whole text
    events = []
    result = await asolve("Q", schedule="off", backend=backend, stream_answer=True, on_event=events.append)
    assert [e.content for e in events if isinstance(e, AnswerDelta)] == [result.answer]


async def test_without_stream_answer_no_deltas_are_sent():
    backend = StreamingScriptedBackend()
    events = []
    await asolve("Q", schedule=[2], backend=backend, on_event=events.append)
    assert not any(isinstance(e, AnswerDelta) for e in events) and backend.streamed == []


# --- first_round (trajectory pool reuse) ------------------------------------


async def test_first_round_pool_replaces_round_one_calls():
    pool = [
        Completion(text="<think>x</think>pool-A", completion_tokens=7),
        Trajectory(round=5, index=9, text="<think>y</think>pool-B", completion_tokens=8),
        Completion(text="pool-FAILED", error="cut", error_kind="timeout"),
        Trajectory(round=0, index=0, text="pool-C", message="stale message"),
    ]
    backend = ScriptedBackend()
    result = await asolve("Q", schedule=[4], backend=backend, first_round=pool)
    assert len(backend.calls) == 1  # only the synthesis call
    first = result.rounds[0]
    assert [(t.round, t.index) for t in first.trajectories] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert [t.message for t in first.trajectories] == ["pool-A", "pool-B", None, "pool-C"]
    prompt = backend.calls[0].last_user_text
    assert all(m in prompt for m in ("pool-A", "pool-B", "pool-C"))
    assert "FAILED" not in prompt and "stale" not in prompt
    assert result.usage.completion_tokens >= 15


@pytest.mark.parametrize(("schedule", "size"), [([4], 3), ([4], 5), ("off", 1)])
async def test_first_round_of_the_wrong_size_is_refused(schedule, size):
    backend = ScriptedBackend()
    with pytest.raises(UsageError, match="first_round"):
        await asolve("Q", schedule=schedule, backend=backend, first_round=[Completion(text="a")] * size)
    assert backend.calls == []


# --- input validation and results -------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "problem"),
    [
        ("", "empty"),
        ("  \n ", "empty"),
        ([], "empty"),
        ([{"role": "system", "content": "hi"}], "no user message"),
        ([{"role": "user", "content": "Q"}, {"role": "user", "content": " "}], "last user message is empty"),
        ([{"role": "user", "content": [{"type": "text", "text": ""}]}], "last user message is empty"),
        (["just a string"], "not a chat message"),
        ([{"content": "no role"}], "not a chat message"),
        ([{"role": "user", "content": 42}], "neither text nor a list"),
        (None, "string or a list of chat messages"),
        (42, "string or a list of chat messages"),
    ],
)
async def test_unusable_input_raises_input_error(prompt, problem):
    backend = ScriptedBackend()
    with pytest.raises(InputError, match=problem):
        await asolve(prompt, backend=backend)
    assert backend.calls == []


async def test_an_image_only_question_is_accepted():
    backend = ScriptedBackend()
    result = await asolve([{"role": "user", "content": [IMAGE]}], schedule=[1], backend=backend)
    assert result.answer and backend.calls[-1].messages[-1]["content"][1:] == [IMAGE]


async def test_a_backend_of_the_wrong_type_is_a_usage_error():
    with pytest.raises(UsageError, match="backend must be"):
        await asolve("Q", backend=42)


async def test_result_round_trips_through_json():
    backend = ScriptedBackend(
        respond=first_round_replies(
            lambda call, i: (
                Completion(text="", error="x", error_kind="status")
                if call.number == 1
                else Completion(text=f"<think>r</think>m{call.number}", reasoning="why", completion_tokens=3)
            )
        )
    )
    result = await asolve("Q", schedule=[3], backend=backend, seed=4)
    again = Result.model_validate_json(result.model_dump_json())
    assert again == result
    assert again.rounds[1].references == result.rounds[1].references


def test_solve_runs_without_a_loop():
    result = pacore.solve("Q", schedule=[2], backend=ScriptedBackend())
    assert result.answer == "answer 2.0"


async def test_solve_inside_a_running_loop_points_to_asolve():
    with pytest.raises(RuntimeError, match=r"running event loop; use 'await asolve"):
        solve("Q", backend=ScriptedBackend())
