"""The engine's adaptive-compute policies (issue 13) on scripted backends: what each policy
decides, what the trace records (stopped, dropped, policy_note, usage), and that with every
policy off the engine sends exactly what it sent before."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from fakes import ScriptedBackend
from harness import fast_backend  # noqa: E402
from pacore import ComputePolicy
from pacore.adaptive import majority_probability, percentile
from pacore.api import asolve, iter_solve
from pacore.backends.base import (
    BaseBackend,
    Completion,
    ConfidenceCallback,
    GenerationParams,
    Message,
    ProgressCallback,
    text_of,
)
from pacore.confidence import lowest_group_at, summarize
from pacore.engine import asample
from pacore.errors import BackendError, DeadlineExceededError, UsageError
from pacore.schedule import MAX_TRAJECTORIES_PER_ROUND
from pacore.trace import Final, Result, RoundFinished, Trajectory, TrajectoryFinished, TrajectoryProgress

STRIDE = MAX_TRAJECTORIES_PER_ROUND + 1  # the engine's seed stride per round (see engine._call_seed)
SEEDED = GenerationParams(seed=0)


@dataclass
class Paced:
    """What one trajectory generates: ``tokens`` tokens, one every ``pace`` seconds, sent in
    chunks of ``chunk`` tokens (progress counts chunks, as the HTTP backend does)."""

    text: str
    tokens: int = 10
    pace: float = 0.002
    confidence: float | Sequence[float] | None = None
    chunk: int = 1

    def confidences(self) -> list[float] | None:
        if self.confidence is None:
            return None
        if isinstance(self.confidence, (int, float)):
            return [float(self.confidence)] * self.tokens
        return list(self.confidence)


@dataclass
class PacedBackend(BaseBackend):
    """Streams each sample token by token, as a server would, until done or cancelled.

    ``script(round, index)`` says what trajectory ``index`` of ``round`` generates
    (read from the engine's per-call seed, so requests must be seeded); synthesis
    rounds answer ``final`` at once unless ``script_synthesis``. Progress and token
    confidences (when the request asks for logprobs) are reported per token;
    cancelled calls are listed.
    """

    script: Callable[[int, int], Paced] = lambda r, i: Paced(f"\\boxed{{{i}}}")
    final: str = "final answer"
    script_synthesis: bool = False
    name: str = "paced"
    model: str = "paced"
    started: list[tuple[int, int]] = field(default_factory=list)
    params: list[GenerationParams] = field(default_factory=list)
    cancelled: list[tuple[int, int, int]] = field(default_factory=list)  # round, index, tokens sent
    #: Seconds a cancelled call takes to wind down (an HTTP teardown, a thread noticing the cancel).
    teardown_s: float = 0.0
    #: When set, a cancelled call winds down only once the synthesis call has started (or after
    #: ``teardown_s``), so a test can tell from the order alone whether the round waited for it.
    teardown_until_synthesis: bool = False
    #: How many cancelled calls had wound down when each synthesis call started.
    wound_down_at_synthesis: list[int] = field(default_factory=list)
    _synthesis_started: asyncio.Event = field(default_factory=asyncio.Event)

    async def generate(
        self,
        messages: Sequence[Message],
        n: int,
        params: GenerationParams,
        on_progress: ProgressCallback | None = None,
        on_confidence: ConfidenceCallback | None = None,
    ) -> list[Completion]:
        assert n == 1, "a per-trajectory policy samples one trajectory per call"
        self.params.append(params)
        if not self.script_synthesis and "Reference Responses" in text_of(messages[-1]["content"]):
            self.wound_down_at_synthesis.append(len(self.cancelled))
            self._synthesis_started.set()
            return [Completion(text=self.final, finish_reason="stop", completion_tokens=2)]
        assert params.seed is not None, "seed the request: the script is keyed by the call's seed"
        rnd, index = divmod(params.seed, STRIDE)
        self.started.append((rnd, index))
        paced = self.script(rnd, index)
        confidences = paced.confidences() if params.top_logprobs else None
        sent = 0
        try:
            while sent < paced.tokens:
                await asyncio.sleep(paced.pace * paced.chunk)
                chunk = range(sent, min(sent + paced.chunk, paced.tokens))
                sent = chunk.stop
                if on_progress is not None:
                    on_progress(0, math.ceil(sent / paced.chunk))
                if on_confidence is not None and confidences is not None:
                    on_confidence(0, confidences[chunk.start : chunk.stop])
        except asyncio.CancelledError:
            if self.teardown_until_synthesis:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._synthesis_started.wait(), self.teardown_s)
            elif self.teardown_s:
                await asyncio.sleep(self.teardown_s)
            self.cancelled.append((rnd, index, sent))
            raise
        return [
            Completion(
                text=paced.text,
                finish_reason="stop",
                prompt_tokens=3,
                completion_tokens=paced.tokens,
                token_confidences=confidences,
            )  # fmt: skip
        ]


def round_one(result: Result):
    return result.rounds[0]


def stopped(result: Result) -> dict[int, str]:
    return {t.index: t.stopped for t in round_one(result).trajectories if t.stopped}


# --- off by default ------------------------------------------------------------


@pytest.mark.parametrize("compute", [ComputePolicy(), {}])
async def test_policies_off_send_the_same_calls_and_trace_as_no_policy(compute):
    async def run(**options):
        backend = ScriptedBackend(max_n=4)
        result = await asolve("What is 2+2?", schedule=[8, 2], backend=backend, params=SEEDED, **options)
        return backend.calls, result

    plain_calls, plain = await run()
    calls, result = await run(compute=compute)
    assert [(c.messages, c.n, c.params) for c in calls] == [(c.messages, c.n, c.params) for c in plain_calls]
    assert [c.n for c in calls] == [4, 4, 2, 1]  # batching kept: no per-trajectory policy is on
    assert all(c.params.top_logprobs is None for c in calls)

    def timeless(res: Result) -> dict:
        dump = res.model_dump(exclude={"elapsed_s"})
        for rnd in dump["rounds"]:
            rnd.pop("started_at"), rnd.pop("elapsed_s")
        return dump

    assert timeless(result) == timeless(plain)


async def test_confidence_asks_every_call_for_logprobs():
    backend = ScriptedBackend(max_n=4)
    await asolve("Q", schedule=[4], backend=backend, compute=ComputePolicy(confidence=True, top_logprobs=7))
    assert [c.params.top_logprobs for c in backend.calls] == [7, 7]
    assert [c.n for c in backend.calls] == [4, 1]  # confidence alone keeps batching


async def test_sampling_a_pool_may_ask_for_confidence_only():
    backend = ScriptedBackend()
    await asample("Q", 2, backend=backend, compute={"confidence": True, "keep_token_confidences": True})
    assert [c.params.top_logprobs for c in backend.calls] == [5, 5]
    with pytest.raises(UsageError, match="only the confidence settings"):
        await asample("Q", 2, backend=backend, compute=ComputePolicy(quorum=0.5))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compute": {"quorum": 2}}, r"^compute policy: quorum: Input should be less than or equal to 1$"),
        ({"compute": {"wave": 3, "nope": 1}}, r"^compute policy: nope: Extra inputs are not permitted$"),
        ({"compute": "fast"}, r"^compute must be a ComputePolicy, a dict of its fields or None, not 'fast'$"),
        ({"compute": {"keep_top": 0.5}, "schedule": []}, r"need a schedule with at least one coordinated round"),
        (
            {"compute": {"budget_tokens": 100}, "schedule": [4, 2], "params": GenerationParams(max_tokens=50)},
            r"^budget_tokens=100 cannot run one trajectory of each of the 3 rounds at max_tokens=50 "
            r"\(needs at least 150\)$",
        ),
    ],
)
async def test_bad_policies_are_one_line_usage_errors(options, message):
    backend = ScriptedBackend()
    with pytest.raises(UsageError, match=message) as caught:
        await asolve("Q", backend=backend, **{"schedule": [4], **options})
    assert "\n" not in str(caught.value)
    assert backend.calls == []


# --- pure pieces ------------------------------------------------------------------


def test_majority_probability_is_the_exact_beta_tail():
    # P(p > 1/2) for Beta(a+1, b+1), by hand: sum_{j<=a} C(a+b+1, j) / 2^(a+b+1).
    assert majority_probability(0, 0) == 0.5
    assert majority_probability(4, 0) == 31 / 32
    assert majority_probability(3, 1) == 26 / 32
    assert majority_probability(2, 2) == 0.5  # a tie is a coin flip
    # Against numeric integration of the Beta density (midpoint rule).
    for a, b in [(5, 2), (9, 3), (1, 6)]:
        steps = 20000
        norm = math.factorial(a + b + 1) / (math.factorial(a) * math.factorial(b))
        tail = sum(norm * x**a * (1 - x) ** b for x in ((0.5 + (i + 0.5) / (2 * steps)) for i in range(steps)))
        assert majority_probability(a, b) == pytest.approx(tail / (2 * steps), abs=1e-6)
    with pytest.raises(ValueError):
        majority_probability(-1, 0)


def test_percentile_interpolates_between_ranks():
    assert percentile([4.0, 1.0, 3.0, 2.0], 10) == pytest.approx(1.3)
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([7.0], 90) == 7.0


# --- quorum -----------------------------------------------------------------------


def fast_and_slow(fast: int):
    """Trajectories below ``fast`` finish 10 tokens in ~40 ms, the others would take 50 in ~0.5 s."""
    return lambda r, i: Paced(f"\\boxed{{{i}}}", tokens=10, pace=0.004) if i < fast else Paced("slow", 50, 0.01)


async def test_quorum_ends_the_round_and_cancels_the_stragglers():
    backend = PacedBackend(script=fast_and_slow(4))
    result = await asolve("Q", schedule=[8], backend=backend, params=SEEDED, compute=ComputePolicy(quorum=0.5))
    first = round_one(result)
    assert stopped(result) == {4: "quorum", 5: "quorum", 6: "quorum", 7: "quorum"}
    assert sorted(i for _, i, _ in backend.cancelled) == [4, 5, 6, 7]
    cut = [t for t in first.trajectories if t.stopped]
    # Stopped: no message, not a failure, and the tokens generated so far count.
    assert all(t.message is None and t.ok for t in cut)
    sent = {i: tokens for _, i, tokens in backend.cancelled}
    assert all(t.completion_tokens == sent[t.index] for t in cut)
    assert sum(t.completion_tokens for t in cut) > 0
    assert result.usage.completion_tokens == 4 * 10 + sum(sent.values()) + 2
    assert sorted(i for _, i in result.rounds[1].references) == [0, 1, 2, 3]
    assert first.policy_note == "quorum: ended after 4 of 8 finished, 4 cancelled"
    assert first.seconds_saved is not None and first.seconds_saved > 0


async def test_a_round_ends_at_its_quorum_without_waiting_for_the_cancelled_calls_to_wind_down():
    # A cancelled call winds down only once the synthesis call has started: had the round waited
    # for the teardowns, each would have taken its full 5 s and the synthesis would see them done.
    backend = PacedBackend(script=fast_and_slow(4), teardown_s=5.0, teardown_until_synthesis=True)
    result = await asolve("Q", schedule=[8], backend=backend, params=SEEDED, compute=ComputePolicy(quorum=0.5))
    assert stopped(result) == {4: "quorum", 5: "quorum", 6: "quorum", 7: "quorum"}
    assert backend.wound_down_at_synthesis == [0]  # the final call did not wait for the teardowns
    # The request itself does: no call outlives it.
    assert sorted(i for _, i, _ in backend.cancelled) == [4, 5, 6, 7]
    assert all(task.done() for task in asyncio.all_tasks() if task is not asyncio.current_task())
    cut = {t.index: t.completion_tokens for t in round_one(result).trajectories if t.stopped}
    assert cut == {i: tokens for _, i, tokens in backend.cancelled}


async def test_straggler_timeout_keeps_stragglers_that_finish_in_time():
    # 6 fast; 6 and 7 finish ~0.1 s later (within the 10 s grace, however loaded the machine); nothing is cut.
    script = lambda r, i: Paced(f"\\boxed{{{i}}}", pace=0.002 if i < 6 else 0.01)  # noqa: E731
    backend = PacedBackend(script=script)
    policy = ComputePolicy(quorum=0.5, straggler_timeout=10)
    result = await asolve("Q", schedule=[8], backend=backend, params=SEEDED, compute=policy)
    assert stopped(result) == {} and backend.cancelled == []
    assert round_one(result).policy_note is None
    # With a grace too short for them, they are cut when it runs out.
    backend = PacedBackend(script=fast_and_slow(4))
    policy = ComputePolicy(quorum=0.5, straggler_timeout=0.05)
    result = await asolve("Q", schedule=[8], backend=backend, params=SEEDED, compute=policy)
    assert set(stopped(result).values()) == {"quorum"} and len(stopped(result)) == 4
    assert round_one(result).elapsed_s >= 0.05  # the grace was waited for


async def test_policy_rounds_emit_progress_and_stopped_trajectories_through_iter_solve():
    backend = PacedBackend(script=fast_and_slow(2))
    options = {"schedule": [4], "backend": backend, "params": SEEDED, "compute": {"quorum": 0.5}}
    events = [event async for event in iter_solve("Q", **options)]
    progress = [e for e in events if isinstance(e, TrajectoryProgress)]
    assert progress and all(e.round == 0 for e in progress)
    finished = [e.trajectory for e in events if isinstance(e, TrajectoryFinished) and e.round == 0]
    assert sorted(t.stopped or "" for t in finished) == ["", "", "quorum", "quorum"]
    (summary,) = [e.round for e in events if isinstance(e, RoundFinished) and e.round.index == 0]
    assert summary.policy_note == "quorum: ended after 2 of 4 finished, 2 cancelled"
    assert isinstance(events[-1], Final) and events[-1].result.rounds[0].policy_note == summary.policy_note


async def test_a_cut_trajectory_counts_its_tokens_not_its_chunks_when_logprobs_come_back():
    def script(r, i):
        if i < 2:
            return Paced(f"\\boxed{{{i}}}", tokens=8, pace=0.002, confidence=2.0, chunk=4)
        return Paced("slow", tokens=400, pace=0.002, confidence=2.0, chunk=4)

    backend = PacedBackend(script=script)
    result = await asolve(
        "Q", schedule=[4], backend=backend, params=SEEDED, compute={"quorum": 0.5, "confidence": True}
    )
    sent = {i: tokens for _, i, tokens in backend.cancelled}
    cut = [t for t in round_one(result).trajectories if t.stopped]
    assert len(cut) == 2 and all(t.completion_tokens == sent[t.index] for t in cut)
    assert all(t.completion_tokens % 4 == 0 and t.confidence.token_count == t.completion_tokens for t in cut)


# --- budget -------------------------------------------------------------------------


async def test_budget_opens_only_what_its_worst_case_allows_and_keeps_the_final_round():
    backend = PacedBackend(script=lambda r, i: Paced(f"\\boxed{{{i}}}", tokens=10))
    params = GenerationParams(seed=0, max_tokens=10)
    result = await asolve("Q", schedule=[8], backend=backend, params=params, compute=ComputePolicy(budget_tokens=55))
    # 55 - 10 kept for the final round: four trajectories of at most 10 tokens each.
    assert len(round_one(result).trajectories) == 4 and sorted(backend.started) == [(0, i) for i in range(4)]
    assert round_one(result).policy_note == (
        "budget: opened 4 of 8 trajectories (worst case 10 tokens each, one kept for each later round)"
    )
    assert result.rounds[-1].trajectories[0].text == "final answer"
    assert result.usage.completion_tokens <= 55


async def test_budget_reopens_as_short_trajectories_leave_room():
    # Worst case 10, but each trajectory stops after 2 tokens: room frees up as they finish.
    backend = PacedBackend(script=lambda r, i: Paced(f"\\boxed{{{i}}}", tokens=2))
    params = GenerationParams(seed=0, max_tokens=10)
    result = await asolve("Q", schedule=[8], backend=backend, params=params, compute=ComputePolicy(budget_tokens=35))
    assert len(round_one(result).trajectories) == 8
    assert round_one(result).policy_note is None


async def test_budget_without_max_tokens_cuts_running_trajectories_at_the_cap():
    backend = PacedBackend(script=lambda r, i: Paced(f"\\boxed{{{i}}}", tokens=40))
    result = await asolve("Q", schedule=[4], backend=backend, params=SEEDED, compute=ComputePolicy(budget_tokens=100))
    first = round_one(result)
    # Estimate 100 // 5 = 20 per trajectory: 4 open, 20 kept for the final round; 80 for round 1.
    assert len(first.trajectories) == 4
    assert set(stopped(result).values()) == {"budget"}
    assert first.completion_tokens <= 80 + 4  # cut within a token of the cap per running trajectory
    assert "budget:" in (first.policy_note or "") and "cut when the budget ran out" in first.policy_note
    assert result.rounds[-1].trajectories[0].ok  # the final round still runs (on the original problem)


# --- adaptive width -----------------------------------------------------------------


async def test_adaptive_width_stops_once_the_answer_is_settled():
    backend = PacedBackend(script=lambda r, i: Paced("so \\boxed{42}"))
    policy = ComputePolicy(adaptive_k=True, wave=4)
    result = await asolve("Q", schedule=[16], backend=backend, params=SEEDED, compute=policy)
    first = round_one(result)
    assert [t.index for t in first.trajectories] == [0, 1, 2, 3]
    assert first.k == 16
    assert (
        first.policy_note
        == "adaptive width: answer settled after 4 of 16 (leader 4 of 4 answers, runner-up 0, P(majority)=0.969)"
    )
    assert len(result.rounds[1].references) == 4


async def test_adaptive_width_samples_on_while_the_answers_disagree():
    # Answers 0,1,0,1,...: never settled, so all 12 are sampled in waves of 4.
    backend = PacedBackend(script=lambda r, i: Paced(f"\\boxed{{{i % 2}}}"))
    policy = ComputePolicy(adaptive_k=True, wave=4)
    result = await asolve("Q", schedule=[12], backend=backend, params=SEEDED, compute=policy)
    assert len(round_one(result).trajectories) == 12
    assert round_one(result).policy_note == "adaptive width: not settled, sampled 12 of 12"


async def test_adaptive_width_tests_the_leader_against_the_runner_up_not_every_other_answer():
    # 6 of 8 for one answer, the other 2 split two ways: against the runner-up's 1 vote,
    # P = 0.965 settles it (against both others it would be 0.910, and sampling would go on).
    # The first wave (3 to 1, P = 0.81) does not.
    answers = {1: 6, 4: 8}
    backend = PacedBackend(script=lambda r, i: Paced(f"\\boxed{{{answers.get(i, 5)}}}"))
    policy = ComputePolicy(adaptive_k=True, wave=4)
    result = await asolve("Q", schedule=[16], backend=backend, params=SEEDED, compute=policy)
    assert len(round_one(result).trajectories) == 8
    assert round_one(result).policy_note == (
        "adaptive width: answer settled after 8 of 16 (leader 6 of 8 answers, runner-up 1, P(majority)=0.965)"
    )


async def test_adaptive_width_settles_on_a_clear_majority_after_more_waves():
    # One dissent in the first wave (3 of 4: P=0.81 < 0.95), then agreement: 7 of 8 gives P=0.98.
    backend = PacedBackend(script=lambda r, i: Paced("\\boxed{5}" if i != 1 else "\\boxed{6}"))
    policy = ComputePolicy(adaptive_k=True, wave=4)
    result = await asolve("Q", schedule=[16], backend=backend, params=SEEDED, compute=policy)
    assert len(round_one(result).trajectories) == 8
    assert "settled after 8 of 16 (leader 7 of 8 answers, runner-up 1" in round_one(result).policy_note


# --- keep-top -------------------------------------------------------------------------


def confident_replies(levels: Sequence[float]):
    """Round-1 replies ``message i`` whose every token has confidence ``levels[i]``."""

    def respond(call, i):
        if "Reference Responses" in call.last_user_text:
            return "final answer"
        index = call.params.seed % STRIDE + i
        return Completion(
            text=f"message {index}", finish_reason="stop", completion_tokens=3,
            token_confidences=[levels[index]] * 3,
        )  # fmt: skip

    return respond


async def test_keep_top_synthesizes_only_the_most_confident_messages():
    backend = ScriptedBackend(respond=confident_replies([1.0, 4.0, 2.0, 3.0, 3.0]), max_n=8)
    policy = ComputePolicy(keep_top=0.5)
    result = await asolve("Q", schedule=[5], backend=backend, params=SEEDED, compute=policy)
    assert [c.n for c in backend.calls] == [5, 1]  # keep-top needs no per-trajectory calls
    assert all(t.confidence is not None for t in round_one(result).trajectories)
    synthesis = result.rounds[1]
    # ceil(0.5 * 5) = 3 kept: 4.0 and the two 3.0s; the tie is no problem, both fit.
    assert sorted(i for _, i in synthesis.references) == [1, 3, 4]
    assert synthesis.dropped == [(0, 0), (0, 2)]  # least confident first
    prompt = backend.calls[1].last_user_text
    assert "message 1" in prompt and "message 4" in prompt and "message 0" not in prompt and "message 2" not in prompt
    assert synthesis.policy_note == "keep-top: 3 of 5 messages kept"


async def test_keep_top_breaks_ties_by_index_and_keeps_at_least_one():
    backend = ScriptedBackend(respond=confident_replies([2.0, 2.0, 2.0, 2.0]), max_n=8)
    result = await asolve("Q", schedule=[4], backend=backend, params=SEEDED, compute=ComputePolicy(keep_top=0.1))
    assert result.rounds[1].references == [(0, 0)]
    assert result.rounds[1].dropped == [(0, 3), (0, 2), (0, 1)]


async def test_keep_top_without_logprobs_keeps_every_message_and_says_why():
    backend = ScriptedBackend(max_n=8)  # returns no token confidences
    result = await asolve("Q", schedule=[4], backend=backend, compute=ComputePolicy(keep_top=0.5))
    assert len(result.rounds[1].references) == 4 and result.rounds[1].dropped == []
    assert result.rounds[1].policy_note == (
        "keep-top: no confidence recorded (did the backend return logprobs?); all 4 messages kept"
    )


# --- online early stop ------------------------------------------------------------------


def confident_then_doubtful(doubtful: set[int], fast: int = 4, fast_pace: float = 0.002):
    """``fast`` quick confident trajectories (5.0 per token), then slow ones: doubtful (1.0) or sure (9.0)."""

    def script(r, i):
        if i < fast:
            return Paced(f"\\boxed{{{i}}}", tokens=10, pace=fast_pace, confidence=5.0)
        return Paced(f"\\boxed{{{i}}}", tokens=40, pace=0.005, confidence=1.0 if i in doubtful else 9.0)

    return script


async def test_early_stop_cancels_trajectories_whose_confidence_falls_below_the_warmup_threshold():
    backend = PacedBackend(script=confident_then_doubtful({4, 6}))
    policy = ComputePolicy(early_stop=True, warmup=4, window=4)
    result = await asolve("Q", schedule=[8], backend=backend, params=SEEDED, compute=policy)
    first = round_one(result)
    assert stopped(result) == {4: "early_stop", 6: "early_stop"}
    assert sorted(i for _, i, _ in backend.cancelled) == [4, 6]
    cut = {t.index: t for t in first.trajectories if t.stopped}
    # Cut mid-stream: some tokens generated and counted, fewer than the 40 planned.
    assert all(0 < t.completion_tokens < 40 and t.message is None and t.ok for t in cut.values())
    assert all(t.confidence is not None and t.confidence.lowest_group == 1.0 for t in cut.values())
    assert [t.completion_tokens for t in first.trajectories if t.index in (5, 7)] == [40, 40]
    # Saved: each stopped one counted as long as the mean finished one, (4*10 + 2*40) / 6 = 20.
    assert first.tokens_saved == sum(20 - t.completion_tokens for t in cut.values())
    assert first.policy_note == f"early stop: threshold 5.000, 2 stopped, about {first.tokens_saved} tokens saved"
    assert sorted(i for _, i in result.rounds[1].references) == [0, 1, 2, 3, 5, 7]
    assert all(p.top_logprobs == 5 for p in backend.params)


async def test_early_stop_with_warmup_first_judges_later_trajectories_from_their_first_window():
    async def cut_tokens(warmup_first: bool) -> list[int]:
        # The warm-up takes ~0.1 s; the doubtful ones make a token every 5 ms.
        backend = PacedBackend(script=confident_then_doubtful({4, 6}, fast_pace=0.01))
        policy = ComputePolicy(early_stop=True, warmup=4, window=4, warmup_first=warmup_first)
        result = await asolve("Q", schedule=[8], backend=backend, params=SEEDED, compute=policy)
        assert stopped(result) == {4: "early_stop", 6: "early_stop"}
        return [t.completion_tokens for t in round_one(result).trajectories if t.stopped]

    # Opened after the warm-up, with the threshold known: cut at their first full window.
    assert await cut_tokens(warmup_first=True) == [4, 4]
    # In parallel with it, they ran on until the threshold existed.
    assert all(tokens > 8 for tokens in await cut_tokens(warmup_first=False))


async def test_early_stop_says_when_no_trajectory_reached_a_full_window():
    backend = PacedBackend(script=confident_then_doubtful({4, 6}))
    policy = ComputePolicy(early_stop=True, warmup=4, window=64)  # longer than every 10- or 40-token trajectory
    result = await asolve("Q", schedule=[8], backend=backend, params=SEEDED, compute=policy)
    assert stopped(result) == {}
    assert round_one(result).policy_note == (
        "early stop: threshold 5.000, 0 stopped, about 0 tokens saved "
        "(no trajectory reached a full window of 64 tokens, so none could be judged)"
    )


async def test_early_stop_does_nothing_when_k_is_not_above_warmup():
    backend = PacedBackend(script=confident_then_doubtful({4, 6}))
    policy = ComputePolicy(early_stop=True, warmup=8, window=4)
    result = await asolve("Q", schedule=[8], backend=backend, params=SEEDED, compute=policy)
    assert stopped(result) == {}
    assert round_one(result).policy_note == "early stop: off for this round (K=8 is not above warmup 8)"


async def test_early_stop_without_logprobs_stops_nothing_and_says_so():
    script = confident_then_doubtful({4, 6})
    backend = PacedBackend(script=lambda r, i: Paced(script(r, i).text, script(r, i).tokens, script(r, i).pace))
    policy = ComputePolicy(early_stop=True, warmup=2, window=4)
    result = await asolve("Q", schedule=[6], backend=backend, params=SEEDED, compute=policy)
    assert stopped(result) == {}
    assert round_one(result).policy_note == (
        "early stop: fewer than 2 trajectories finished with confidence; none stopped"
    )


# --- offline replay over a stored round 1 -------------------------------------------------


def pooled(text: str, confidences: Sequence[float]) -> Trajectory:
    """A stored round-1 trajectory that kept its per-token confidences."""
    return Trajectory(
        round=0, index=0, text=text, finish_reason="stop", prompt_tokens=3, completion_tokens=len(confidences),
        confidence=summarize(confidences, 2048, keep_tokens=True),
    )  # fmt: skip


async def test_replayed_early_stop_cuts_where_the_online_monitor_would():
    doubtful = [5.0] * 4 + [1.0] * 16  # the window of 4 ending at token 4 averages 4.0 < 5.0
    pool = [pooled(f"\\boxed{{{i}}}", [5.0] * 10) for i in range(4)]
    pool += [
        pooled("\\boxed{9}", doubtful),
        Completion(text="\\boxed{1}", completion_tokens=8, token_confidences=[9.0] * 8),
    ]
    backend = ScriptedBackend()
    policy = ComputePolicy(early_stop=True, warmup=4, window=4)
    result = await asolve("Q", schedule=[6], backend=backend, first_round=pool, compute=policy)
    assert len(backend.calls) == 1  # only the synthesis call: round 1 came from the pool
    first = round_one(result)
    assert stopped(result) == {4: "early_stop"}
    cut = first.trajectories[4]
    assert (cut.completion_tokens, cut.message, cut.text) == (5, None, "")
    assert cut.confidence is not None and cut.confidence.token_count == 5
    assert first.tokens_saved == 15
    assert first.policy_note == "early stop: threshold 5.000, 1 stopped, 15 tokens saved (replayed)"
    assert result.usage.completion_tokens == 4 * 10 + 5 + 8 + 2  # and the synthesis reply "answer 0.0"
    assert sorted(i for _, i in result.rounds[1].references) == [0, 1, 2, 3, 5]
    # The same decision online, on a live stream with the same confidences.
    assert lowest_group_at(doubtful, 4, 5.0) == 4


async def test_replayed_early_stop_says_when_no_trajectory_reached_a_full_window():
    pool = [pooled(f"\\boxed{{{i}}}", [5.0] * 4 + [1.0] * 16) for i in range(6)]
    policy = ComputePolicy(early_stop=True, warmup=2, window=64)  # longer than the 20-token trajectories
    result = await asolve("Q", schedule=[6], backend=ScriptedBackend(), first_round=pool, compute=policy)
    assert stopped(result) == {}
    assert round_one(result).policy_note == (
        "early stop: threshold 1.800, 0 stopped, 0 tokens saved "
        "(no trajectory reached a full window of 64 tokens, so none could be judged) (replayed)"
    )


async def test_replayed_adaptive_width_adopts_the_pool_wave_by_wave():
    pool = [Completion(text="so \\boxed{3}", completion_tokens=7) for _ in range(16)]
    backend = ScriptedBackend()
    policy = ComputePolicy(adaptive_k=True, wave=4)
    result = await asolve("Q", schedule=[16], backend=backend, first_round=pool, compute=policy)
    first = round_one(result)
    assert [t.index for t in first.trajectories] == [0, 1, 2, 3]
    assert first.policy_note == (
        "adaptive width: answer settled after 4 of 16 (leader 4 of 4 answers, runner-up 0, P(majority)=0.969) (replayed)"
    )
    assert result.usage.completion_tokens == 4 * 7 + 2  # only what was adopted counts
    assert len(backend.calls) == 1


async def test_replayed_keep_top_ranks_the_stored_confidences():
    pool = [pooled(f"message {i}", [float(level)] * 3) for i, level in enumerate([3, 1, 2, 4])]
    backend = ScriptedBackend()
    result = await asolve("Q", schedule=[4], backend=backend, first_round=pool, compute=ComputePolicy(keep_top=0.5))
    assert sorted(i for _, i in result.rounds[1].references) == [0, 3]
    assert result.rounds[1].dropped == [(0, 1), (0, 2)]


async def test_early_stop_replay_needs_stored_per_token_confidences():
    pool = [pooled("a", [5.0] * 3), Trajectory(round=0, index=1, text="b", completion_tokens=3)]
    backend = ScriptedBackend()
    with pytest.raises(UsageError, match=r"^first_round trajectory 1 has no per-token confidences") as caught:
        await asolve("Q", schedule=[2], backend=backend, first_round=pool, compute=ComputePolicy(early_stop=True))
    assert "\n" not in str(caught.value) and backend.calls == []


# --- combined, and when things go wrong ------------------------------------------------------


async def test_policies_combine_and_their_notes_add_up():
    def script(r, i):
        return Paced(f"\\boxed{{{i}}}", tokens=10, pace=0.002 if i < 2 else 0.05, confidence=float(i + 1))

    backend = PacedBackend(script=script, script_synthesis=True)
    policy = ComputePolicy(keep_top=0.5, quorum=0.5)
    result = await asolve("Q", schedule=[4, 4], backend=backend, params=SEEDED, compute=policy)
    second = result.rounds[1]
    # Round 2's prompt keeps the more confident of round 1's two messages; round 2 has its own quorum.
    assert second.references == [(0, 1)] and second.dropped == [(0, 0)]
    assert second.policy_note == "keep-top: 1 of 2 messages kept; quorum: ended after 2 of 4 finished, 2 cancelled"
    assert round_one(result).policy_note == "quorum: ended after 2 of 4 finished, 2 cancelled"


async def test_deepconf_online_warms_up_first_stops_weak_trajectories_and_stops_sampling_once_settled():
    # DeepConf's online algorithm: early stop with the warm-up first, plus adaptive width (its adaptive sampling).
    # Warm-up (wave 1): 7, 7, 7, 9 at confidence 5 (threshold 5.0; P(majority) 0.81: not settled).
    # Wave 2: 4 loses confidence at once and is cut at its first window; 5-7 answer 7: six of seven, P 0.965.
    def script(r, i):
        if i < 4:
            return Paced(f"\\boxed{{{9 if i == 3 else 7}}}", tokens=10, confidence=5.0)
        return Paced("\\boxed{8}" if i == 4 else "\\boxed{7}", tokens=20, confidence=1.0 if i == 4 else 9.0)

    backend = PacedBackend(script=script)
    policy = ComputePolicy(early_stop=True, warmup=4, warmup_first=True, window=4, adaptive_k=True, wave=4)
    result = await asolve("Q", schedule=[16], backend=backend, params=SEEDED, compute=policy)
    first = round_one(result)
    # Nothing after the settling wave was opened, and the warm-up was opened alone.
    assert sorted(i for _, i in backend.started) == list(range(8))
    assert {i for _, i in backend.started[:4]} == {0, 1, 2, 3}
    # Judged from its first window: the threshold existed before it started.
    assert stopped(result) == {4: "early_stop"}
    (cut,) = [t for t in first.trajectories if t.stopped]
    assert cut.completion_tokens == 4 and cut.message is None
    # The trace says what each part did, adaptive width first.
    assert first.policy_note == (
        "adaptive width: answer settled after 8 of 16 (leader 6 of 7 answers, runner-up 1, P(majority)=0.965); "
        f"early stop: threshold 5.000, 1 stopped, about {first.tokens_saved} tokens saved"
    )
    assert first.tokens_saved == round((4 * 10 + 3 * 20) / 7) - 4
    assert sorted(i for _, i in result.rounds[1].references) == [0, 1, 2, 3, 5, 6, 7]
    assert result.usage.completion_tokens == 4 * 10 + 4 + 3 * 20 + 2


async def test_a_deadline_cancels_every_running_trajectory_and_keeps_the_finished_ones():
    # 2 finish in ~40 ms, 2 never would: a deadline far past the fast ones holds on a loaded machine.
    script = lambda r, i: Paced(f"\\boxed{{{i}}}", tokens=10, pace=0.004) if i < 2 else Paced("slow", 10**6, 0.01)  # noqa: E731
    backend = PacedBackend(script=script)
    with pytest.raises(DeadlineExceededError) as caught:
        await asolve("Q", schedule=[4], backend=backend, params=SEEDED, compute={"quorum": 1}, deadline=2.0)
    assert sorted(i for _, i, _ in backend.cancelled) == [2, 3]
    assert [t.index for t in caught.value.result.rounds[0].trajectories] == [0, 1]
    await asyncio.sleep(0.05)
    assert all(task.done() for task in asyncio.all_tasks() if task is not asyncio.current_task())


async def test_a_fatal_backend_error_ends_the_request_and_cancels_the_rest():
    def script(r, i):
        if i == 1:
            raise BackendError("HTTP 401: bad key", kind="auth")
        return Paced("slow", tokens=50, pace=0.01)

    backend = PacedBackend(script=script)
    with pytest.raises(BackendError, match="bad key"):
        await asolve("Q", schedule=[3], backend=backend, params=SEEDED, compute={"early_stop": True})
    assert sorted(i for _, i, _ in backend.cancelled) == [0, 2]


async def test_a_failed_trajectory_is_recorded_and_the_round_goes_on():
    def script(r, i):
        if i == 0:
            raise BackendError("HTTP 503", kind="status")
        return Paced(f"\\boxed{{{i}}}")

    backend = PacedBackend(script=script)
    result = await asolve("Q", schedule=[3], backend=backend, params=SEEDED, compute={"quorum": 1})
    first = round_one(result)
    assert [(t.index, t.error_kind) for t in first.trajectories] == [(0, "status"), (1, None), (2, None)]
    assert sorted(i for _, i in result.rounds[1].references) == [1, 2]


# --- over HTTP, on a loopback server ----------------------------------------------------


async def test_quorum_over_http_cancels_the_calls_still_waiting():
    # Two samples at a time, 2 s each: once two have finished, the other two are cut (2 s before
    # they would finish: room for a loaded machine's delays).
    with fast_backend("--tokens-per-s", 10, "--completion-tokens", 20, "--concurrency", 2) as server:
        policy = ComputePolicy(quorum=0.5)
        result = await asolve("Q", schedule=[4], backend=server.url, params=SEEDED, compute=policy)
    first = round_one(result)
    finished = [t for t in first.trajectories if t.stopped is None]
    assert len(finished) == 2 and all(t.completion_tokens == 20 for t in finished)
    assert sorted(stopped(result).values()) == ["quorum", "quorum"]
    assert len(result.rounds[1].references) == 2
    assert first.policy_note == "quorum: ended after 2 of 4 finished, 2 cancelled"


async def test_budget_over_http_cuts_streams_mid_way_and_counts_their_tokens():
    # 100 tokens per call at 200/s; the budget leaves 80 tokens for round 1 (see the scripted test).
    with fast_backend("--tokens-per-s", 200, "--completion-tokens", 100) as server:
        policy = ComputePolicy(budget_tokens=100)
        result = await asolve("Q", schedule=[4], backend=server.url, params=SEEDED, compute=policy)
    first = round_one(result)
    assert sorted(stopped(result).values()) == ["budget"] * 4
    assert all(0 < t.completion_tokens < 100 for t in first.trajectories)
    assert 80 <= first.completion_tokens <= 80 + 4  # each stream is cut within a token of the cap
    assert result.usage.completion_tokens == first.completion_tokens + result.rounds[1].completion_tokens


# --- the embedded model ------------------------------------------------------------------


@pytest.mark.model
async def test_early_stop_cancels_a_live_generation_on_the_embedded_model():
    from pacore.backends.llama_cpp import LlamaCppBackend

    # One warm-up trajectory sets the threshold at its lowest 2-token window; the embedded
    # model runs one sequence at a time, so the others are judged token by token as they
    # stream. Seeded: with this seed all three later ones dip below it (seeds 0-2 all stop some).
    policy = ComputePolicy(early_stop=True, warmup=1, window=2)
    params = GenerationParams(max_tokens=24, seed=1)
    result = await asolve("Name three colours.", schedule=[4], backend=LlamaCppBackend(), params=params, compute=policy)
    first = round_one(result)
    assert all(t.confidence is not None for t in first.trajectories)
    cut = [t for t in first.trajectories if t.stopped == "early_stop"]
    assert cut, first.policy_note
    assert all(0 < t.completion_tokens < 24 and t.finish_reason is None for t in cut)
    # With one warm-up trajectory, the threshold is its lowest group: each cut one fell below it.
    warmup = next(t for t in first.trajectories if t.finish_order == 0)
    assert warmup.stopped is None and warmup.confidence is not None
    assert all(t.confidence is not None and t.confidence.lowest_group < warmup.confidence.lowest_group for t in cut)
    assert result.answer  # the final round ran on the same backend after the cancellations
