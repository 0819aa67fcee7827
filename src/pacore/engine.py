"""The PaCoRe engine: rounds, compaction and synthesis over a Backend.

Pure orchestration: no HTTP, no files, no printing. Every front door (CLI,
Python API, server, batch runner) calls :func:`asolve` with a Backend it
opened; the Python API's :mod:`pacore.api` opens backend specs for it.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from pydantic import ValidationError

from pacore import trace
from pacore.adaptive import POLICIES_OFF, ComputePolicy, majority_probability, percentile
from pacore.answers import tally
from pacore.backends.base import (
    Backend,
    Completion,
    ConfidenceCallback,
    GenerationParams,
    Message,
    ProgressCallback,
    RetryBudget,
    accepts_confidence,
    accepts_progress,
    current_retry_budget,
    is_backend,
)
from pacore.confidence import WindowedConfidence, lowest_group_at, summarize
from pacore.errors import (
    BackendError,
    DeadlineExceededError,
    InputError,
    PacoreError,
    RoundFailedError,
    UsageError,
)

# THINK_END and last_user_text are re-exported: callers have long imported them from here.
from pacore.messages import THINK_END, compact, last_user_index, last_user_text, non_text_parts, text_of  # noqa: F401
from pacore.prompts import SynthesisTemplate
from pacore.schedule import MAX_TRAJECTORIES_PER_ROUND, Schedule
from pacore.synthesis import REFERENCE_ORDERS, ReferenceOrder, build_synthesis_input

T = TypeVar("T")
EventCallback = Callable[[trace.Event], None]
Prompt = str | Sequence[Message]

#: Least seconds between two TrajectoryProgress events of a round.
PROGRESS_INTERVAL_S = 0.25


def normalize_messages(prompt: Prompt) -> list[Message]:
    """Validate a prompt string or OpenAI-style message list into messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("the prompt is empty")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)):
        raise InputError(f"the prompt must be a string or a list of chat messages, not {type(prompt).__name__}")
    # mypy loses the narrowing to Sequence[Message] in the bytes check above; each item is checked below.
    messages = list(cast(Sequence[Message], prompt))
    if not messages:
        raise InputError("the message list is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise InputError(f"message {i} is not a chat message with a role")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InputError(f"message {i} has content that is neither text nor a list of parts")
    last = last_user_index(messages)
    if last is None:
        raise InputError("the conversation has no user message to answer")
    content = messages[last].get("content")
    if not text_of(content).strip() and not non_text_parts(content):
        raise InputError("the last user message is empty")
    return messages


def _call_seed(seed: int | None, round_index: int, first_index: int) -> int | None:
    """A distinct, reproducible sampling seed per call (same seed = same samples)."""
    if seed is None:
        return None
    # The round stride exceeds any round's size, so no two calls of a request share a seed.
    stride = MAX_TRAJECTORIES_PER_ROUND + 1
    return (seed * 1_000_003 + round_index * stride + first_index) % (2**31)


def _split(k: int, max_n: int) -> list[tuple[int, int]]:
    """``(first_index, n)`` of each call a round of ``k`` is split into."""
    step = max(1, max_n)
    return [(start, min(step, k - start)) for start in range(0, k, step)]


def _exactly(completions: list[Completion], n: int) -> list[Completion]:
    """Hold a backend to its contract of ``n`` samples per call.

    Some servers silently ignore ``n``; the missing samples are recorded as
    protocol failures instead of leaving a round short.
    """
    missing = Completion(
        text="",
        error=f"the backend returned {len(completions)} of {n} requested samples",
        error_kind="protocol",
    )
    return completions[:n] + [missing] * (n - len(completions))


class _RoundProgress:
    """A round's live token counts, emitted as :class:`TrajectoryProgress` at a throttled rate."""

    __slots__ = ("round", "emit", "pending", "next_at")

    def __init__(self, round_index: int, emit: EventCallback) -> None:
        self.round = round_index
        self.emit = emit
        self.pending: dict[int, int] = {}
        self.next_at = 0.0

    def callback(self, first: int) -> ProgressCallback:
        """The backend's ``on_progress`` for a call whose first sample is trajectory ``first``."""
        return lambda index, tokens: self.report(first + index, tokens)

    def report(self, trajectory: int, tokens: int) -> None:
        self.pending[trajectory] = tokens
        now = time.monotonic()
        if now >= self.next_at:
            self.next_at = now + PROGRESS_INTERVAL_S
            pending, self.pending = self.pending, {}
            self.emit(trace.TrajectoryProgress(round=self.round, tokens=pending))

    def finished(self, first: int, n: int) -> None:
        """Forget the counts of a finished call's trajectories (their final event says it all)."""
        for index in range(first, first + n):
            self.pending.pop(index, None)


def adopt_first_round(
    items: Sequence[Completion | trace.Trajectory], compute: ComputePolicy | None = None
) -> list[trace.Trajectory]:
    """Pre-generated round-1 trajectories as the engine records them (``asolve(first_round=...)``).

    Numbered in the given order, which is also their completion order, with
    compaction recomputed: a pool may hold trajectories built without it.
    The training export builds its prompts from these too. A completion's
    confidence is summarized with ``compute``'s window.
    """
    adopted = []
    for i, item in enumerate(items):
        if isinstance(item, trace.Trajectory):
            message = compact(item.text) if item.ok else None
            trajectory = item.model_copy(update={"round": 0, "index": i, "message": message, "finish_order": i})
        else:
            trajectory = trace.Trajectory.from_completion(0, i, item, compute)
            trajectory.finish_order = i
        adopted.append(trajectory)
    return adopted


@dataclass(eq=False)
class _Solve:
    """State of one request; one instance per ``asolve`` call."""

    messages: list[Message]
    schedule: Schedule
    backend: Backend
    params: GenerationParams
    template: SynthesisTemplate
    seed: int
    emit: EventCallback | None
    min_success: float | None
    stream_answer: bool
    first_round: Sequence[Completion | trace.Trajectory] | None
    reference_order: ReferenceOrder = "shuffle"
    compute: ComputePolicy = POLICIES_OFF
    reports_progress: bool = field(init=False)
    budget: _Budget | None = field(init=False)
    rounds: list[trace.Round] = field(init=False, default_factory=list)
    #: Calls a policy cancelled and the rounds stopped waiting for (see ``_PolicyRound._leave_stopped``).
    winding_down: set[asyncio.Task[Completion]] = field(init=False, default_factory=set)
    started: float = field(init=False, default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.compute.wants_confidence:
            self.params = replace(self.params, top_logprobs=self.compute.top_logprobs)
        self.reports_progress = self.emit is not None and accepts_progress(self.backend)
        budget = self.compute.budget_tokens
        self.budget = None if budget is None else _Budget(budget, self.params.max_tokens, sum(self.schedule.ks))

    def result(self, answer: str = "", error: str | None = None) -> trace.Result:
        return trace.Result(
            answer=answer,
            schedule=self.schedule.as_list(),
            rounds=self.rounds,
            usage=trace.usage_of(self.rounds),
            model=self.backend.model,
            backend=self.backend.name,
            seed=self.seed,
            elapsed_s=time.perf_counter() - self.started,
            error=error,
        )

    async def run(self) -> trace.Result:
        try:
            return await self._run_rounds()
        finally:
            # No call outlives the request: the cancelled ones have long wound down by now
            # (whatever they ended with, the trajectory is already recorded as stopped).
            await asyncio.gather(*self.winding_down, return_exceptions=True)

    async def _run_rounds(self) -> trace.Result:
        ks = self.schedule.ks
        total = len(ks)
        previous: trace.Round | None = None
        for index, k in enumerate(ks):
            final = index == total - 1
            if previous is None:
                conversation, references, bypassed = self.messages, [], False
            else:
                synthesis = build_synthesis_input(
                    self.messages, previous.trajectories, template=self.template, order=self.reference_order,
                    seed=self.seed, round_index=index, total_rounds=total, keep_top=self.compute.keep_top,
                )  # fmt: skip
                conversation, references, bypassed = synthesis.conversation, synthesis.references, synthesis.bypassed
            rnd = trace.Round(
                index=index, k=k, final=final, references=references, bypassed=bypassed, started_at=time.time()
            )
            if previous is not None and self.compute.keep_top is not None:
                _note_keep_top(rnd, previous, synthesis.dropped)
            self.rounds.append(rnd)
            if self.emit:
                self.emit(trace.RoundStarted(round=index, k=k, final=final, total_rounds=total, bypassed=bypassed))
            round_started = time.perf_counter()
            if index == 0 and self.first_round is not None:
                self._adopt_first_round(rnd)
            elif final and self.stream_answer:
                await self._streamed_call(rnd, conversation)
            elif not final and self.compute.per_trajectory:
                await _PolicyRound(self, rnd, conversation, later_rounds=total - 1 - index).run()
            else:
                await self._run_round(rnd, conversation)
            rnd.elapsed_s = time.perf_counter() - round_started
            if self.emit:
                self.emit(trace.RoundFinished(round=rnd))
            if rnd.trajectories or final:  # the budget may open none in a coordinated round
                self._check_round(rnd)
            previous = rnd
        final_trajectory = self.rounds[-1].trajectories[0]
        # The answer is for people and graders: stripped. The trace keeps the message's bytes.
        return self.result(answer=(final_trajectory.message or "").strip())

    def _record(self, rnd: trace.Round, trajectory: trace.Trajectory) -> None:
        # The release orders references by completion (see pacore.synthesis); adopted
        # trajectories are recorded in index order, which defines theirs.
        trajectory.finish_order = len(rnd.trajectories)
        if self.budget is not None:
            self.budget.spend(trajectory.completion_tokens)
        # Kept in index order as calls finish, so a partial round in an error's result is too.
        bisect.insort(rnd.trajectories, trajectory, key=lambda t: t.index)
        if self.emit:
            self.emit(
                trace.TrajectoryFinished(round=rnd.index, trajectory=trajectory, done=len(rnd.trajectories), k=rnd.k)
            )

    def _adopt_first_round(self, rnd: trace.Round) -> None:
        if self.compute.early_stop or self.compute.adaptive_k:
            _replay_first_round(self, rnd)
            return
        for trajectory in adopt_first_round(self.first_round or (), self.compute):
            self._record(rnd, trajectory)

    async def _run_round(self, rnd: trace.Round, conversation: list[Message], start: int = 0) -> None:
        calls = [(start + first, n) for first, n in _split(rnd.k, self.backend.max_n)]
        progress = _RoundProgress(rnd.index, self.emit) if self.reports_progress and self.emit else None
        if len(calls) == 1:
            await self._call(rnd, conversation, *calls[0], progress)
            return
        await run_all([self._call(rnd, conversation, first, n, progress) for first, n in calls])

    async def _call(
        self, rnd: trace.Round, conversation: list[Message], first: int, n: int, progress: _RoundProgress | None
    ) -> None:
        params = self.params.with_seed(_call_seed(self.params.seed, rnd.index, first))
        try:
            if progress is None:
                completions = await self.backend.generate(conversation, n, params)
            else:
                completions = await self.backend.generate(conversation, n, params, on_progress=progress.callback(first))
        except BackendError as exc:
            if exc.fatal:
                raise
            completions = [Completion(text="", error=str(exc), error_kind=exc.kind) for _ in range(n)]
        finally:
            if progress is not None:
                progress.finished(first, n)
        for offset, completion in enumerate(_exactly(completions, n)):
            self._record(rnd, trace.Trajectory.from_completion(rnd.index, first + offset, completion, self.compute))

    async def _streamed_call(self, rnd: trace.Round, conversation: list[Message]) -> None:
        emit = self.emit

        def on_delta(content: str, reasoning: str) -> None:
            if emit and (content or reasoning):
                emit(trace.AnswerDelta(content=content, reasoning=reasoning))

        params = self.params.with_seed(_call_seed(self.params.seed, rnd.index, 0))
        try:
            completion = await self.backend.stream(conversation, params, on_delta)
        except BackendError as exc:
            if exc.fatal:
                raise
            completion = Completion(text="", error=str(exc), error_kind=exc.kind)
        self._record(rnd, trace.Trajectory.from_completion(rnd.index, 0, completion, self.compute))

    def _check_round(self, rnd: trace.Round) -> None:
        """Too few successful calls end the request; successful but empty ones do not
        (the next round then bypasses the template, see :mod:`pacore.synthesis`)."""
        label = "final round" if rnd.final else f"round {rnd.index + 1}"
        succeeded = rnd.succeeded
        # What was opened: adaptive width and the budget may open fewer than k.
        opened = len(rnd.trajectories)
        why = too_few_succeeded(opened, succeeded, None if rnd.final else self.min_success, "trajectories")
        if why is not None:
            if not succeeded:
                why += ": " + next((t.error for t in rnd.trajectories if t.error), "no trajectory ran")
            raise RoundFailedError(f"{label}: {why}")


class _Budget:
    """A problem's token budget (``ComputePolicy.budget_tokens``).

    A trajectory is opened only if its worst case fits in what is left after
    the tokens already generated, the worst case of the trajectories still
    running, and one trajectory's worst case reserved for each later round (so
    every round, the final one above all, still runs). The worst case is
    ``max_tokens``; without it, an estimate: the longest trajectory of the
    request so far, and at least an even share of the budget over the
    schedule's planned trajectories (final included). Since an estimate can be
    exceeded, running trajectories are also cut (``stopped="budget"``) once
    the tokens generated reach what the later rounds do not need. The final
    round is never cut, so without ``max_tokens`` it may overrun its reserve.
    """

    def __init__(self, total: int, max_tokens: int | None, planned: int) -> None:
        self.total = total
        self.max_tokens = max_tokens
        self.even_share = max(1, total // planned)
        self.spent = 0
        self.longest = 0

    def spend(self, tokens: int) -> None:
        self.spent += tokens
        self.longest = max(self.longest, tokens)

    @property
    def worst_case(self) -> int:
        if self.max_tokens is not None:
            return self.max_tokens
        return max(self.even_share, self.longest)

    def available(self, later_rounds: int) -> int:
        """Tokens this round may still generate, one worst case being kept for each later round."""
        return self.total - self.spent - later_rounds * self.worst_case


class _PolicyRound:
    """A coordinated round under the request's :class:`ComputePolicy`, one trajectory per call.

    Opens trajectories (all K, or wave by wave with adaptive width, as far as
    the budget allows), records each as it finishes, and cancels the ones a
    policy ends: the rest once a quorum has finished (``"quorum"``), one whose
    windowed confidence falls below the early-stop threshold (``"early_stop"``),
    and running ones once the budget is spent (``"budget"``). A cancelled
    trajectory keeps the tokens the backend reported for it so far.
    """

    def __init__(self, solve: _Solve, rnd: trace.Round, conversation: list[Message], later_rounds: int) -> None:
        self.solve = solve
        self.rnd = rnd
        self.conversation = conversation
        self.later_rounds = later_rounds
        self.policy = policy = solve.compute
        self.progress = _RoundProgress(rnd.index, solve.emit) if solve.reports_progress and solve.emit else None
        self.with_progress = accepts_progress(solve.backend)
        # Confidences drive early stop, and count a stopped trajectory's tokens exactly
        # (progress counts streamed chunks, which may hold several tokens).
        self.with_confidence = policy.wants_confidence and accepts_confidence(solve.backend)
        self.adaptive = policy.adaptive_k and rnd.index == 0
        self.target = min(policy.wave, rnd.k) if self.adaptive else rnd.k
        self.quorum = None if policy.quorum is None else math.ceil(policy.quorum * rnd.k)
        self.running: dict[asyncio.Task[Completion], int] = {}
        self.tasks: dict[int, asyncio.Task[Completion]] = {}  # the running ones by trajectory index
        self.opened_at: dict[int, float] = {}
        self.live: dict[int, int] = {}  # tokens so far of running trajectories (see _set_live)
        self.live_total = 0
        self.stopping: dict[int, str] = {}  # running trajectories being cancelled, and why
        self.monitors: dict[int, WindowedConfidence] = {}
        self.confidences: dict[int, list[float]] = {}
        self.warmup_lowest: list[float] = []
        self.threshold: float | None = None
        self.finished = 0  # trajectories that ran to their end and succeeded
        self.ended = False
        self.quorum_cut = False
        self.straggler_deadline: float | None = None
        self.budget_limited = False
        self.notes: list[str] = []

    async def run(self) -> None:
        try:
            while True:
                self._open()
                self._leave_stopped()
                if not self.running:
                    if self._next_wave():
                        continue
                    break
                done, _ = await asyncio.wait(
                    self.running, timeout=self._straggler_wait(), return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    self._finish(task)
                self._check_quorum()
        finally:
            # An error or an outside cancellation: no call may outlive the round.
            for task in self.running:
                task.cancel()
            await asyncio.gather(*self.running, return_exceptions=True)
        self._note_round()

    # --- opening ---------------------------------------------------------------

    def _open(self) -> None:
        while not self.ended and len(self.opened_at) < self._opening_limit():
            budget = self.solve.budget
            if budget is not None:
                committed = budget.worst_case * len(self.running) + budget.worst_case
                if committed > budget.available(self.later_rounds):
                    self.budget_limited = True
                    return
            index = len(self.opened_at)
            self.opened_at[index] = time.perf_counter()
            task = self.tasks[index] = asyncio.create_task(self._generate(index))
            self.running[task] = index
            self.budget_limited = False

    def _opening_limit(self) -> int:
        """How many trajectories may be open by now: the wave, and with ``warmup_first`` only the
        warm-up until it has finished (failed ones included, so a failure cannot stall the round)."""
        policy = self.policy
        if policy.early_stop and policy.warmup_first and len(self.rnd.trajectories) < policy.warmup:
            return min(self.target, policy.warmup)
        return self.target

    def _next_wave(self) -> bool:
        """Adaptive width: whether to sample another wave, after the settle test on what finished."""
        if not self.adaptive or self.ended or self.budget_limited or self.target >= self.rnd.k:
            return False
        note = settled_note(self.rnd, len(self.opened_at), self.policy.settle_threshold)
        if note is not None:
            self.notes.append(note)
            return False
        self.target = min(self.target + self.policy.wave, self.rnd.k)
        return True

    async def _generate(self, index: int) -> Completion:
        solve = self.solve
        params = solve.params.with_seed(_call_seed(solve.params.seed, self.rnd.index, index))
        callbacks: dict[str, ProgressCallback | ConfidenceCallback] = {}
        if self.with_progress:
            callbacks["on_progress"] = lambda _sample, tokens: self._on_progress(index, tokens)
        if self.with_confidence:
            callbacks["on_confidence"] = lambda _sample, values: self._on_confidence(index, values)
        try:
            completions = await solve.backend.generate(self.conversation, 1, params, **callbacks)  # type: ignore[arg-type]
        except BackendError as exc:
            if exc.fatal:
                raise
            return Completion(text="", error=str(exc), error_kind=exc.kind)
        return _exactly(completions, 1)[0]

    # --- while running ---------------------------------------------------------

    def _on_progress(self, index: int, tokens: int) -> None:
        if index not in self.tasks:
            return  # scheduled by a backend thread before the call ended
        if self.progress is not None:
            self.progress.report(index, tokens)
        self._set_live(index, max(tokens, len(self.confidences.get(index, ()))))

    def _on_confidence(self, index: int, values: Sequence[float]) -> None:
        if index not in self.tasks:
            return  # scheduled by a backend thread before the call ended
        monitor = self.monitors.get(index)
        if monitor is None:
            monitor = self.monitors[index] = WindowedConfidence(self.policy.window)
            self.confidences[index] = []
        monitor.add(values)
        self.confidences[index].extend(values)
        self._set_live(index, max(self.live.get(index, 0), monitor.count))
        if self.threshold is not None and monitor.below(self.threshold):
            self._stop(index, "early_stop")

    def _set_live(self, index: int, tokens: int) -> None:
        """A running trajectory's tokens so far: its progress count, or its token confidences when more."""
        self.live_total += tokens - self.live.get(index, 0)
        self.live[index] = tokens
        budget = self.solve.budget
        if budget is not None and self.live_total > budget.available(self.later_rounds):
            self._stop_all("budget")  # all at once: each stream overshoots by what is in flight, not by a report

    def _stop(self, index: int, why: str) -> None:
        task = self.tasks.get(index)
        if task is not None and index not in self.stopping:
            self.stopping[index] = why
            task.cancel()

    def _stop_all(self, why: str) -> None:
        for index in list(self.running.values()):
            self._stop(index, why)

    def _leave_stopped(self) -> None:
        """Once every running trajectory is being cancelled, record them and let the round end now.

        Their calls wind down (HTTP teardown, a thread noticing) in the
        background, awaited by the request before it returns, so the next
        round's call is not held up by them.
        """
        if not self.running or any(index not in self.stopping for index in self.running.values()):
            return
        for task in list(self.running):
            self.solve.winding_down.add(task)
            self._finish(task)

    def _straggler_wait(self) -> float | None:
        if self.straggler_deadline is None:
            return None
        return max(0.0, self.straggler_deadline - time.perf_counter())

    def _check_quorum(self) -> None:
        if self.quorum is None or self.finished < self.quorum or self.quorum_cut:
            return
        self.ended = True  # no trajectory is opened once the quorum is met
        if not self.running:
            return
        timeout = self.policy.straggler_timeout
        if timeout:
            if self.straggler_deadline is None:
                self.straggler_deadline = time.perf_counter() + timeout
            if self._straggler_wait():
                return
        self.quorum_cut = True
        self.straggler_deadline = None
        self._estimate_latency_saved()
        self._stop_all("quorum")

    # --- finishing -------------------------------------------------------------

    def _finish(self, task: asyncio.Task[Completion]) -> None:
        index = self.running.pop(task)
        del self.tasks[index]
        if self.progress is not None:
            self.progress.finished(index, 1)
        tokens = self.live.pop(index, 0)
        self.live_total -= tokens
        self.monitors.pop(index, None)
        why = self.stopping.pop(index, None)
        if task.cancelled() or not task.done():
            assert why is not None, "only a policy cancels a trajectory's call"
            trajectory = trace.Trajectory(
                round=self.rnd.index, index=index, completion_tokens=tokens, stopped=why,
                latency_s=time.perf_counter() - self.opened_at[index], confidence=self._confidence_so_far(index),
            )  # fmt: skip
        else:
            self.confidences.pop(index, None)
            trajectory = trace.Trajectory.from_completion(self.rnd.index, index, task.result(), self.policy)
            if trajectory.ok:
                self.finished += 1
                self._warm_up(trajectory)
        self.solve._record(self.rnd, trajectory)

    def _confidence_so_far(self, index: int) -> trace.Confidence | None:
        values = self.confidences.pop(index, None)
        if not values:
            return None
        return summarize(values, self.policy.window, self.policy.keep_token_confidences)

    def _warm_up(self, trajectory: trace.Trajectory) -> None:
        """Early stop: the first ``warmup`` finished trajectories set the threshold."""
        if not self.policy.early_stop or self.threshold is not None or trajectory.confidence is None:
            return
        self.warmup_lowest.append(trajectory.confidence.lowest_group)
        if len(self.warmup_lowest) < self.policy.warmup:
            return
        self.threshold = percentile(self.warmup_lowest, self.policy.early_stop_percentile)
        for index, monitor in self.monitors.items():
            if monitor.below(self.threshold):
                self._stop(index, "early_stop")

    def _estimate_latency_saved(self) -> None:
        """Quorum: a conservative estimate of the seconds the cancelled stragglers would have taken.

        Each straggler is assumed to need only as many tokens as the mean
        finished trajectory of the round (or what it already has, if more),
        at the rate it was generating; stragglers that reported no tokens are
        left out. The saving is the slowest one's remaining time.
        """
        mean_length = self._mean_finished_length()
        now = time.perf_counter()
        remaining = [
            (now - self.opened_at[index]) * (max(mean_length, tokens) / tokens - 1)
            for index, tokens in self.live.items()
            if tokens
        ]
        self.rnd.seconds_saved = max(remaining, default=0.0)

    def _mean_finished_length(self) -> float:
        """Mean tokens of the round's trajectories that ran to their end (what the estimates assume)."""
        lengths = [t.completion_tokens for t in self.rnd.trajectories if t.ok and t.stopped is None]
        return sum(lengths) / len(lengths) if lengths else 0.0

    def _note_round(self) -> None:
        rnd = self.rnd
        stopped = Counter(t.stopped for t in rnd.trajectories if t.stopped)
        opened = len(self.opened_at)
        if self.adaptive and not any(note.startswith("adaptive width") for note in self.notes):
            self.notes.append(f"adaptive width: not settled, sampled {opened} of {rnd.k}")
        if self.budget_limited and self.solve.budget is not None:
            self.notes.append(
                f"budget: opened {opened} of {rnd.k} trajectories "
                f"(worst case {self.solve.budget.worst_case} tokens each, one kept for each later round)"
            )
        if "budget" in stopped:
            self.notes.append(f"budget: {stopped['budget']} running trajectories cut when the budget ran out")
        if "quorum" in stopped:
            self.notes.append(f"quorum: ended after {self.finished} of {rnd.k} finished, {stopped['quorum']} cancelled")
        if self.policy.early_stop:
            self.notes.append(self._early_stop_note(stopped["early_stop"]))
        # Keep-top's note on this round's prompt comes first.
        rnd.policy_note = "; ".join(([rnd.policy_note] if rnd.policy_note else []) + self.notes) or None

    def _early_stop_note(self, stopped: int) -> str:
        if self.rnd.k <= self.policy.warmup:
            return f"early stop: off for this round (K={self.rnd.k} is not above warmup {self.policy.warmup})"
        if self.threshold is None:
            return f"early stop: fewer than {self.policy.warmup} trajectories finished with confidence; none stopped"
        # Each stopped trajectory is assumed to have been heading for the mean finished length.
        mean_length = round(self._mean_finished_length())
        cut = [t.completion_tokens for t in self.rnd.trajectories if t.stopped == "early_stop"]
        self.rnd.tokens_saved = saved = sum(max(0, mean_length - tokens) for tokens in cut)
        note = f"early stop: threshold {self.threshold:.3f}, {stopped} stopped, about {saved} tokens saved"
        return note + (_short_of_window(self.rnd, self.policy.window) if not stopped else "")


def settled_note(rnd: trace.Round, sampled: int, threshold: float) -> str | None:
    """Adaptive width's stopping test on a round's answers so far: the note saying so if settled, else ``None``.

    Adaptive-Consistency's Beta test as its authors run it: the leading answer's
    count ``a`` and the runner-up's ``b`` (trajectories stating no answer do
    not count) give ``P(p > 1/2)`` under ``Beta(a + 1, b + 1)``, the chance that
    the leader, not the runner-up, is the majority answer.
    """
    counts = sorted((count for _, count in tally([t.message for t in rnd.trajectories if t.message])), reverse=True)
    leader, runner_up = (counts + [0, 0])[:2]
    probability = majority_probability(leader, runner_up)
    if not leader or probability < threshold:
        return None
    return (
        f"adaptive width: answer settled after {sampled} of {rnd.k} "
        f"(leader {leader} of {sum(counts)} answers, runner-up {runner_up}, P(majority)={probability:.3f})"
    )


def _replay_first_round(solve: _Solve, rnd: trace.Round) -> None:
    """Offline replay of early stop and adaptive width over a stored round 1 (``first_round``).

    The trajectories are taken in the given order, which is their completion
    order. Adaptive width adopts them wave by wave and stops where the online
    test would; trajectories never adopted are not recorded (nor counted).
    Early stop: the first ``warmup`` adopted ones set the threshold from their
    stored per-token confidences; each later one is cut where
    :func:`~pacore.confidence.lowest_group_at` says the online monitor would have
    cut it (``stopped="early_stop"``, its tokens counted up to that point).
    """
    policy = solve.compute
    items = list(solve.first_round or ())
    adopted = adopt_first_round(items, policy)
    wave_end = min(policy.wave, rnd.k) if policy.adaptive_k else rnd.k
    notes: list[str] = []
    warmup_lowest: list[float] = []
    threshold: float | None = None
    saved = cut_count = 0
    taken = 0
    for item, trajectory in zip(items, adopted, strict=True):
        if taken == wave_end:
            note = settled_note(rnd, taken, policy.settle_threshold)
            if note is not None:
                notes.append(note)
                break
            wave_end = min(wave_end + policy.wave, rnd.k)
        taken += 1
        values = stored_token_confidences(item)
        if policy.early_stop and trajectory.ok and values:
            if threshold is None:
                warmup_lowest.append(summarize(values, policy.window).lowest_group)
                if len(warmup_lowest) == policy.warmup:
                    threshold = percentile(warmup_lowest, policy.early_stop_percentile)
            elif (cut := lowest_group_at(values, policy.window, threshold)) is not None:
                kept = values[: cut + 1]
                saved += max(0, trajectory.completion_tokens - len(kept))
                cut_count += 1
                trajectory = trajectory.model_copy(
                    update={
                        "text": "", "reasoning": None, "message": None, "finish_reason": None, "stopped": "early_stop",
                        "completion_tokens": len(kept),
                        "confidence": summarize(kept, policy.window, policy.keep_token_confidences),
                    }
                )  # fmt: skip
        solve._record(rnd, trajectory)
    if policy.adaptive_k and not notes:
        notes.append(f"adaptive width: not settled, sampled {taken} of {rnd.k}")
    if policy.early_stop:
        if threshold is None:
            notes.append(f"early stop: fewer than {policy.warmup} trajectories to warm up with; none stopped")
        else:
            rnd.tokens_saved = saved
            note = f"early stop: threshold {threshold:.3f}, {cut_count} stopped, {saved} tokens saved"
            notes.append(note + (_short_of_window(rnd, policy.window) if not cut_count else ""))
    rnd.policy_note = "; ".join(f"{note} (replayed)" for note in notes) or None


def _short_of_window(rnd: trace.Round, window: int) -> str:
    """Why early stop could stop nothing, when it is that no trajectory reached a full window (else "")."""
    if all(t.confidence is None or t.confidence.token_count < window for t in rnd.trajectories):
        return f" (no trajectory reached a full window of {window} tokens, so none could be judged)"
    return ""


def stored_token_confidences(item: Completion | trace.Trajectory) -> list[float] | None:
    """The per-token confidences a stored trajectory kept, if any."""
    if isinstance(item, Completion):
        return item.token_confidences
    return item.confidence.tokens if item.confidence is not None else None


def _note_keep_top(rnd: trace.Round, previous: trace.Round, dropped: list[tuple[int, int]]) -> None:
    rnd.dropped = dropped
    usable = len(previous.messages)
    if not usable:
        return  # nothing to rank: the round is bypassed
    if not any(t.confidence for t in previous.trajectories if t.message):
        note = f"keep-top: no confidence recorded (did the backend return logprobs?); all {usable} messages kept"
    else:
        note = f"keep-top: {usable - len(dropped)} of {usable} messages kept"
    rnd.policy_note = note


async def run_all(coroutines: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Run ``coroutines`` concurrently until all have finished, as a TaskGroup would.

    The first exception cancels the others, which are awaited, and is then
    raised; a cancellation of the caller cancels them all too. Unlike a
    TaskGroup, the caller is woken once, by the last coroutine to finish and
    from inside it: a TaskGroup first hears of a finished task in a done
    callback, one more pass through the event loop's ready queue, behind every
    other request's stream events. That pass is half of a round-to-round gap
    under load (``round_gap_p99_ms`` in ``bench/orchestration.py``).
    """
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    left = len(coroutines)
    errors: list[Exception] = []

    async def one(coroutine: Coroutine[Any, Any, None]) -> None:
        nonlocal left
        try:
            await coroutine
        except Exception as exc:
            errors.append(exc)
            if not finished.done():
                finished.set_result(None)  # the caller cancels the rest
        finally:
            left -= 1
            if not left and not finished.done():
                finished.set_result(None)

    tasks = [loop.create_task(one(coroutine)) for coroutine in coroutines]
    try:
        await finished
    except asyncio.CancelledError:
        await _cancel_all(tasks)
        raise
    if errors:
        await _cancel_all(tasks)
        raise errors[0]


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until all have finished, even if the caller is cancelled meanwhile (then re-raised)."""
    for task in tasks:
        task.cancel()
    cancelled = False
    while not all(task.done() for task in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def within_deadline(work: Awaitable[T], deadline: float | None, where: Callable[[], str]) -> T:
    """Await ``work``; if ``deadline`` seconds pass first, cancel it and raise
    :class:`DeadlineExceededError` saying ``where()`` it was."""
    clock = asyncio.timeout(deadline)
    try:
        async with clock:
            return await work
    except TimeoutError:
        if not clock.expired():
            raise  # a TimeoutError of the backend's own, not our deadline
        raise DeadlineExceededError(f"deadline of {deadline:g}s exceeded {where()}") from None


def too_few_succeeded(k: int, succeeded: int, min_success: float | None, noun: str) -> str | None:
    """Why ``succeeded`` of ``k`` calls are too few to go on, or ``None``.

    At least one must succeed, and with ``min_success`` that fraction of ``k``.
    """
    needed = 1 if min_success is None else max(1, math.ceil(min_success * k))
    if succeeded >= needed:
        return None
    if not succeeded:
        return "the call failed" if k == 1 else f"all {k} {noun} failed"
    return f"only {succeeded} of {k} {noun} succeeded, {needed} required (min_success={min_success:g})"


async def asample(
    prompt: Prompt,
    n: int,
    *,
    backend: Backend,
    params: GenerationParams | None = None,
    start: int = 0,
    on_event: EventCallback | None = None,
    compute: ComputePolicy | Mapping[str, Any] | None = None,
) -> list[trace.Trajectory]:
    """``n`` independent samples of ``prompt``, drawn exactly as a first round draws them.

    Same call splitting (``backend.max_n``), per-call seeds and failure
    handling as round 1 of :func:`asolve`, without synthesis: for trajectory
    pools and voting baselines. Indices (and so seeds) start at ``start``, so
    a pool can be topped up without repeating samples. Failed samples come
    back as failed trajectories; a fatal :class:`BackendError` is raised.
    ``compute`` may only ask for confidence (``confidence``, ``top_logprobs``,
    ``window``, ``keep_token_confidences``): a pool for offline replay is
    sampled in full, with per-token confidences kept.
    """
    if n < 1:
        raise UsageError(f"the number of samples must be at least 1, got {n}")
    policy = compute_policy(compute)
    if not policy.confidence_only:
        raise UsageError(
            "sampling takes only the confidence settings of a compute policy "
            "(confidence, top_logprobs, window, keep_token_confidences)"
        )
    messages = normalize_messages(prompt)
    state = _Solve(
        messages, Schedule((n,)), backend, params or GenerationParams(), SynthesisTemplate.default(),
        seed=0, emit=on_event, min_success=None, stream_answer=False, first_round=None, compute=policy,
    )  # fmt: skip
    rnd = trace.Round(index=0, k=n, started_at=time.time())
    budget = current_retry_budget.set(RetryBudget())
    try:
        await state._run_round(rnd, messages, start)
    finally:
        current_retry_budget.reset(budget)
    return rnd.trajectories


async def asolve(
    prompt: Prompt,
    *,
    backend: Backend,
    schedule: Schedule | str | int | Sequence[int] | None = None,
    params: GenerationParams | None = None,
    template: SynthesisTemplate | str | Path | None = None,
    seed: int | None = None,
    on_event: EventCallback | None = None,
    min_success: float | None = None,
    deadline: float | None = None,
    stream_answer: bool = False,
    first_round: Sequence[Completion | trace.Trajectory] | None = None,
    reference_order: ReferenceOrder = "shuffle",
    compute: ComputePolicy | Mapping[str, Any] | None = None,
) -> trace.Result:
    """Answer ``prompt`` with parallel coordinated reasoning.

    ``prompt`` is a string or an OpenAI-style message list (text and image
    parts). ``backend`` is the open Backend every call goes to; the caller
    closes it (the public :func:`pacore.asolve` also takes spec strings and
    opens them). ``schedule`` lists the coordinated rounds' trajectory counts (a
    final single-trajectory round is appended). ``template`` is a :class:`SynthesisTemplate`, a built-in's
    name (``"pacore"``, the default: the report's Table 6 prompt;
    ``"generic"``: for models never trained for PaCoRe) or a template file.
    ``seed`` makes the order of the references reproducible
    (defaults to ``params.seed``, else 0); ``reference_order`` is
    ``"shuffle"`` (a seeded shuffle per round) or ``"release"`` (the
    reference release's order: by length, then ``random.Random(seed)``;
    use ``seed=42`` to send what the release sends). ``min_success`` is the fraction of
    a coordinated round's trajectories that must succeed (default: one).
    ``deadline`` is in seconds for the whole request. With ``stream_answer``
    the final call is streamed as :class:`AnswerDelta` events.
    ``first_round`` supplies pre-generated round-1 trajectories (a cached
    pool) instead of sampling them. ``compute`` turns on adaptive-compute
    policies (a :class:`ComputePolicy` or its fields as a dict; all off by
    default, see :mod:`pacore.adaptive`).

    Raises a :class:`PacoreError`; its ``result`` holds the partial trace.
    When cancelled, the ``asyncio.CancelledError`` carries it as ``result`` too.
    """
    messages = normalize_messages(prompt)
    plan = Schedule.parse(schedule)
    params = params or GenerationParams()
    if min_success is not None and not 0 < min_success <= 1:
        raise UsageError(f"min_success must be in (0, 1], got {min_success}")
    if deadline is not None and deadline <= 0:
        raise UsageError(f"deadline must be positive, got {deadline}")
    if reference_order not in REFERENCE_ORDERS:
        raise UsageError(f"reference_order must be one of {', '.join(REFERENCE_ORDERS)}, got {reference_order!r}")
    if first_round is not None:
        if plan.is_passthrough:
            raise UsageError("first_round needs a schedule with at least one coordinated round")
        if len(first_round) != plan.rounds[0]:
            raise UsageError(
                f"first_round holds {len(first_round)} trajectories but the schedule's "
                f"first round runs {plan.rounds[0]}"
            )
    policy = compute_policy(compute)
    check_policy(policy, plan, params)
    if first_round is not None and policy.early_stop:
        _check_replayable(first_round)
    synthesis = SynthesisTemplate.load(template)
    shuffle_seed = seed if seed is not None else (params.seed if params.seed is not None else 0)

    if not is_backend(backend):
        raise UsageError(f"backend must be a Backend, not {backend!r} (pacore.asolve opens backend specs)")
    state = _Solve(
        messages,
        plan,
        backend,
        params,
        synthesis,
        shuffle_seed,
        on_event,
        min_success,
        stream_answer,
        first_round,
        reference_order,
        policy,
    )
    budget = current_retry_budget.set(RetryBudget())
    try:
        result = await within_deadline(state.run(), deadline, lambda: f"in round {len(state.rounds)} of {len(plan.ks)}")
    except PacoreError as exc:
        exc.result = state.result(error=str(exc))
        if on_event:
            on_event(trace.Final(result=exc.result))
        raise
    except asyncio.CancelledError as exc:
        # Cancelled from outside (Ctrl-C in the CLI): the partial trace goes along too.
        exc.result = state.result(error="interrupted")  # type: ignore[attr-defined]
        raise
    finally:
        current_retry_budget.reset(budget)
    if on_event:
        on_event(trace.Final(result=result))
    return result


def compute_policy(compute: ComputePolicy | Mapping[str, Any] | None) -> ComputePolicy:
    """``compute`` as a :class:`ComputePolicy` (``None``: every policy off); bad fields raise a one-line UsageError."""
    if compute is None or isinstance(compute, ComputePolicy):
        return compute or POLICIES_OFF
    if not isinstance(compute, Mapping):
        raise UsageError(f"compute must be a ComputePolicy, a dict of its fields or None, not {compute!r}")
    try:
        return ComputePolicy.model_validate(dict(compute))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        raise UsageError(f"compute policy: {where + ': ' if where else ''}{message}") from None


def check_policy(policy: ComputePolicy, plan: Schedule, params: GenerationParams) -> None:
    """What a policy needs of the request, checked before any call (a :class:`UsageError` if it cannot run)."""
    if plan.is_passthrough and not policy.confidence_only:
        raise UsageError("compute policies other than confidence need a schedule with at least one coordinated round")
    budget, max_tokens = policy.budget_tokens, params.max_tokens
    if budget is not None and max_tokens is not None and budget < max_tokens * len(plan.ks):
        raise UsageError(
            f"budget_tokens={budget} cannot run one trajectory of each of the {len(plan.ks)} rounds "
            f"at max_tokens={max_tokens} (needs at least {max_tokens * len(plan.ks)})"
        )


def _check_replayable(first_round: Sequence[Completion | trace.Trajectory]) -> None:
    """Early stop replays offline only from stored per-token confidences."""
    for index, item in enumerate(first_round):
        if item.ok and stored_token_confidences(item) is None:
            raise UsageError(
                f"first_round trajectory {index} has no per-token confidences, so early stop cannot be replayed "
                "(sample the pool with confidence and keep_token_confidences)"
            )
