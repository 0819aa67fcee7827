"""The PaCoRe engine: rounds, compaction and synthesis over a Backend.

Pure orchestration: no HTTP, no files, no printing. Every front door (CLI,
Python API, server, batch runner) calls :func:`asolve`.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from pacore.backends.base import (
    Backend,
    Completion,
    GenerationParams,
    Message,
    ProgressCallback,
    RetryBudget,
    accepts_progress,
    current_retry_budget,
    text_of,
)
from pacore.errors import (
    BackendError,
    DeadlineExceededError,
    InputError,
    PacoreError,
    RoundFailedError,
    UsageError,
    first_error,
)

# THINK_END and last_user_text are re-exported: callers have long imported them from here.
from pacore.messages import THINK_END, compact, last_user_index, last_user_text, non_text_parts  # noqa: F401
from pacore.prompts import SynthesisTemplate
from pacore.schedule import MAX_TRAJECTORIES_PER_ROUND, Schedule
from pacore.synthesis import REFERENCE_ORDERS, ReferenceOrder, build_synthesis_input
from pacore.trace import (
    AnswerDelta,
    Event,
    Final,
    Result,
    Round,
    RoundFinished,
    RoundStarted,
    Trajectory,
    TrajectoryFinished,
    TrajectoryProgress,
    usage_of,
)

T = TypeVar("T")
EventCallback = Callable[[Event], None]
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
        raise InputError(
            f"the prompt must be a string or a list of chat messages, not {type(prompt).__name__}"
        )
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

        def on_progress(index: int, tokens: int) -> None:
            self.pending[first + index] = tokens
            now = time.monotonic()
            if now >= self.next_at:
                self.next_at = now + PROGRESS_INTERVAL_S
                pending, self.pending = self.pending, {}
                self.emit(TrajectoryProgress(round=self.round, tokens=pending))

        return on_progress

    def finished(self, first: int, n: int) -> None:
        """Forget the counts of a finished call's trajectories (their final event says it all)."""
        for index in range(first, first + n):
            self.pending.pop(index, None)


def adopt_first_round(items: Sequence[Completion | Trajectory]) -> list[Trajectory]:
    """Pre-generated round-1 trajectories as the engine records them (``asolve(first_round=...)``).

    Numbered in the given order, which is also their completion order, with
    compaction recomputed: a pool may hold trajectories built without it.
    The training export builds its prompts from these too.
    """
    adopted = []
    for i, item in enumerate(items):
        if isinstance(item, Trajectory):
            message = compact(item.text) if item.ok else None
            trajectory = item.model_copy(update={"round": 0, "index": i, "message": message, "finish_order": i})
        else:
            trajectory = Trajectory.from_completion(0, i, item)
            trajectory.finish_order = i
        adopted.append(trajectory)
    return adopted


class _Solve:
    """State of one request; one instance per ``asolve`` call."""

    def __init__(
        self,
        messages: list[Message],
        schedule: Schedule,
        backend: Backend,
        params: GenerationParams,
        template: SynthesisTemplate,
        seed: int,
        on_event: EventCallback | None,
        min_success: float | None,
        stream_answer: bool,
        first_round: Sequence[Completion | Trajectory] | None,
        reference_order: ReferenceOrder = "shuffle",
    ) -> None:
        self.messages = messages
        self.schedule = schedule
        self.backend = backend
        self.params = params
        self.template = template
        self.seed = seed
        self.emit = on_event
        self.min_success = min_success
        self.stream_answer = stream_answer
        self.first_round = first_round
        self.reference_order = reference_order
        self.reports_progress = on_event is not None and accepts_progress(backend)
        self.rounds: list[Round] = []
        self.started = time.perf_counter()

    def result(self, answer: str = "", error: str | None = None) -> Result:
        return Result(
            answer=answer,
            schedule=self.schedule.as_list(),
            rounds=self.rounds,
            usage=usage_of(self.rounds),
            model=self.backend.model,
            backend=self.backend.name,
            seed=self.seed,
            elapsed_s=time.perf_counter() - self.started,
            error=error,
        )

    async def run(self) -> Result:
        ks = self.schedule.ks
        total = len(ks)
        previous: Round | None = None
        for index, k in enumerate(ks):
            final = index == total - 1
            if previous is None:
                conversation, references, bypassed = self.messages, [], False
            else:
                synthesis = build_synthesis_input(
                    self.messages, previous.trajectories, template=self.template, order=self.reference_order,
                    seed=self.seed, round_index=index, total_rounds=total,
                )  # fmt: skip
                conversation, references, bypassed = synthesis.conversation, synthesis.references, synthesis.bypassed
            rnd = Round(
                index=index, k=k, final=final, references=references, bypassed=bypassed, started_at=time.time()
            )
            self.rounds.append(rnd)
            if self.emit:
                self.emit(RoundStarted(round=index, k=k, final=final, total_rounds=total, bypassed=bypassed))
            round_started = time.perf_counter()
            if index == 0 and self.first_round is not None:
                self._adopt_first_round(rnd)
            elif final and self.stream_answer:
                await self._streamed_call(rnd, conversation)
            else:
                await self._run_round(rnd, conversation)
            rnd.elapsed_s = time.perf_counter() - round_started
            if self.emit:
                self.emit(RoundFinished(round=rnd))
            self._check_round(rnd)
            previous = rnd
        final_trajectory = self.rounds[-1].trajectories[0]
        # The answer is for people and graders: stripped. The trace keeps the message's bytes.
        return self.result(answer=(final_trajectory.message or "").strip())

    def _record(self, rnd: Round, trajectory: Trajectory) -> None:
        # The release orders references by completion (see pacore.synthesis); adopted
        # trajectories are recorded in index order, which defines theirs.
        trajectory.finish_order = len(rnd.trajectories)
        # Kept in index order as calls finish, so a partial round in an error's result is too.
        bisect.insort(rnd.trajectories, trajectory, key=lambda t: t.index)
        if self.emit:
            self.emit(
                TrajectoryFinished(
                    round=rnd.index, trajectory=trajectory, done=len(rnd.trajectories), k=rnd.k
                )
            )

    def _adopt_first_round(self, rnd: Round) -> None:
        for trajectory in adopt_first_round(self.first_round or ()):
            self._record(rnd, trajectory)

    async def _run_round(self, rnd: Round, conversation: list[Message], start: int = 0) -> None:
        calls = [(start + first, n) for first, n in _split(rnd.k, self.backend.max_n)]
        progress = _RoundProgress(rnd.index, self.emit) if self.reports_progress and self.emit else None
        if len(calls) == 1:
            await self._call(rnd, conversation, *calls[0], progress)
            return
        try:
            async with asyncio.TaskGroup() as group:
                for first, n in calls:
                    group.create_task(self._call(rnd, conversation, first, n, progress))
        except BaseExceptionGroup as group:
            # A fatal backend error cancelled the siblings; surface it alone.
            raise first_error(group) from None

    async def _call(
        self, rnd: Round, conversation: list[Message], first: int, n: int, progress: _RoundProgress | None
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
            self._record(rnd, Trajectory.from_completion(rnd.index, first + offset, completion))

    async def _streamed_call(self, rnd: Round, conversation: list[Message]) -> None:
        emit = self.emit

        def on_delta(content: str, reasoning: str) -> None:
            if emit and (content or reasoning):
                emit(AnswerDelta(content=content, reasoning=reasoning))

        params = self.params.with_seed(_call_seed(self.params.seed, rnd.index, 0))
        try:
            completion = await self.backend.stream(conversation, params, on_delta)
        except BackendError as exc:
            if exc.fatal:
                raise
            completion = Completion(text="", error=str(exc), error_kind=exc.kind)
        self._record(rnd, Trajectory.from_completion(rnd.index, 0, completion))

    def _check_round(self, rnd: Round) -> None:
        """Too few successful calls end the request; successful but empty ones do not
        (the next round then bypasses the template, see :mod:`pacore.synthesis`)."""
        label = "final round" if rnd.final else f"round {rnd.index + 1}"
        succeeded = rnd.succeeded
        why = too_few_succeeded(rnd.k, succeeded, None if rnd.final else self.min_success, "trajectories")
        if why is not None:
            if not succeeded:
                why += ": " + next((t.error for t in rnd.trajectories if t.error), "no trajectory ran")
            raise RoundFailedError(f"{label}: {why}")


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
) -> list[Trajectory]:
    """``n`` independent samples of ``prompt``, drawn exactly as a first round draws them.

    Same call splitting (``backend.max_n``), per-call seeds and failure
    handling as round 1 of :func:`asolve`, without synthesis: for trajectory
    pools and voting baselines. Indices (and so seeds) start at ``start``, so
    a pool can be topped up without repeating samples. Failed samples come
    back as failed trajectories; a fatal :class:`BackendError` is raised.
    """
    if n < 1:
        raise UsageError(f"the number of samples must be at least 1, got {n}")
    messages = normalize_messages(prompt)
    state = _Solve(
        messages, Schedule((n,)), backend, params or GenerationParams(), SynthesisTemplate.default(),
        seed=0, on_event=on_event, min_success=None, stream_answer=False, first_round=None,
    )  # fmt: skip
    rnd = Round(index=0, k=n, started_at=time.time())
    budget = current_retry_budget.set(RetryBudget())
    try:
        await state._run_round(rnd, messages, start)
    finally:
        current_retry_budget.reset(budget)
    return rnd.trajectories


async def asolve(
    prompt: Prompt,
    *,
    schedule: Schedule | str | int | Sequence[int] | None = None,
    backend: Backend | str | Sequence[str] | None = None,
    params: GenerationParams | None = None,
    template: SynthesisTemplate | str | Path | None = None,
    seed: int | None = None,
    on_event: EventCallback | None = None,
    min_success: float | None = None,
    deadline: float | None = None,
    stream_answer: bool = False,
    first_round: Sequence[Completion | Trajectory] | None = None,
    reference_order: ReferenceOrder = "shuffle",
) -> Result:
    """Answer ``prompt`` with parallel coordinated reasoning.

    ``prompt`` is a string or an OpenAI-style message list (text and image
    parts). ``schedule`` lists the coordinated rounds' trajectory counts (a
    final single-trajectory round is appended). ``backend`` is a Backend, a
    backend spec (``http://host:port/v1``, ``gguf:/path``), a list of specs
    (calls go to the least busy, see :func:`pacore.open_backend`) or ``None``
    for the embedded model; a backend opened from specs is closed before
    returning. ``template`` is a :class:`SynthesisTemplate`, a built-in's
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
    pool) instead of sampling them.

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
        raise UsageError(
            f"reference_order must be one of {', '.join(REFERENCE_ORDERS)}, got {reference_order!r}"
        )
    if first_round is not None:
        if plan.is_passthrough:
            raise UsageError("first_round needs a schedule with at least one coordinated round")
        if len(first_round) != plan.rounds[0]:
            raise UsageError(
                f"first_round holds {len(first_round)} trajectories but the schedule's "
                f"first round runs {plan.rounds[0]}"
            )
    synthesis = SynthesisTemplate.load(template)
    shuffle_seed = seed if seed is not None else (params.seed if params.seed is not None else 0)

    owned = not isinstance(backend, Backend)
    if owned and not (backend is None or isinstance(backend, str) or _is_spec_list(backend)):
        raise UsageError(
            f"backend must be a Backend, a backend spec string, a list of specs or None, not {backend!r}"
        )
    if owned:
        from pacore.backends import open_backend

        backend = open_backend(backend)  # type: ignore[arg-type]
    assert isinstance(backend, Backend)
    state = _Solve(
        messages, plan, backend, params, synthesis, shuffle_seed, on_event, min_success,
        stream_answer, first_round, reference_order,
    )
    budget = current_retry_budget.set(RetryBudget())
    try:
        result = await within_deadline(
            state.run(), deadline, lambda: f"in round {len(state.rounds)} of {len(plan.ks)}"
        )
    except PacoreError as exc:
        exc.result = state.result(error=str(exc))
        if on_event:
            on_event(Final(result=exc.result))
        raise
    except asyncio.CancelledError as exc:
        # Cancelled from outside (Ctrl-C in the CLI): the partial trace goes along too.
        exc.result = state.result(error="interrupted")  # type: ignore[attr-defined]
        raise
    finally:
        current_retry_budget.reset(budget)
        if owned:
            await backend.aclose()
    if on_event:
        on_event(Final(result=result))
    return result


def _is_spec_list(value: object) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes, bytearray))
        and all(isinstance(spec, str) for spec in value)
    )


def solve(prompt: Prompt, **options: Any) -> Result:
    """Synchronous :func:`asolve` (for scripts and notebooks without a loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(asolve(prompt, **options))
    raise RuntimeError("solve() was called inside a running event loop; use 'await asolve(...)'")


async def iter_solve(prompt: Prompt, **options: Any) -> AsyncIterator[Event]:
    """Yield the engine's events as they happen; the last one is :class:`Final`.

    Errors are raised after the ``Final`` event that carries the partial trace.
    Closing the iterator early cancels the request and its backend calls.
    """
    queue: asyncio.Queue[Event | None] = asyncio.Queue()
    task = asyncio.create_task(asolve(prompt, on_event=queue.put_nowait, **options))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while (event := await queue.get()) is not None:
            yield event
        await task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
