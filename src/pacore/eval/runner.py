"""Batch runs: a data set under one method, resumable, committed problem by problem.

A run directory holds one data set and one set of generation settings
(model, sampling parameters, template), evaluated under one or more *arms*:

- ``pacore`` with a schedule (every round through :func:`pacore.asolve`);
- ``single``: one plain call per problem (schedule ``off``);
- ``majority`` with ``k`` samples: a majority vote over their extracted answers.

Running the same command again resumes its arm: done problems are skipped,
unfinished ones redone and failed ones retried (unless ``retry_failed`` is
off). A different data set or different generation settings are refused
(:class:`RunConflictError`) unless ``force``, which sets the old database
aside and starts afresh. A new arm joins a run with a trajectory pool freely
(that is what the pool is for) and any other run with ``add_arm``.

With a trajectory pool (``pool_size=P``), P first-round trajectories per
problem are generated once and stored; PaCoRe at K1 <= P and majority@k for
k <= P draw a seeded sample from the pool instead of generating, so
comparing arms costs the pool plus the synthesis calls. The draw depends on
the seed, the problem and the number drawn only, so ``pacore`` with K1 = k
and ``majority`` with k see the very same trajectories.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pacore.backends.base import Backend, GenerationParams
from pacore.engine import asample, asolve, too_few_succeeded, within_deadline
from pacore.errors import DatasetError, PacoreError, RoundFailedError, RunConflictError, UsageError
from pacore.eval.datasets import Problem, dataset_fingerprint
from pacore.eval.grading import extract_answer, grade, majority_vote
from pacore.eval.report import ArmReport, arm_report
from pacore.prompts import SynthesisTemplate
from pacore.synthesis import ReferenceOrder
from pacore.schedule import Schedule
from pacore.store import ArmInfo, ProblemResult, RunInfo, RunStore, StoredProblem
from pacore.trace import Event, Result, Round, RoundStarted, Trajectory, TrajectoryFinished, usage_of

logger = logging.getLogger(__name__)

METHODS = ("pacore", "single", "majority")
DEFAULT_SAMPLES = 16

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Arm:
    """A method with its schedule or sample count; build one with :meth:`build`."""

    method: str
    schedule: Schedule = Schedule(())
    samples: int | None = None

    @classmethod
    def build(
        cls, method: str = "pacore", *, schedule: Schedule | str | None = None, samples: int | None = None
    ) -> Arm:
        method = method.strip().lower()
        if method not in METHODS:
            raise UsageError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        if method != "pacore" and schedule is not None:
            raise UsageError(f"--schedule is for --method pacore, not {method}")
        if method != "majority" and samples is not None:
            raise UsageError(f"--samples is for --method majority, not {method}")
        if method == "pacore":
            plan = Schedule.parse(schedule)
            if plan.is_passthrough:
                raise UsageError("--schedule off is one plain call: use --method single")
            return cls("pacore", plan)
        if method == "single":
            return cls("single")
        k = DEFAULT_SAMPLES if samples is None else samples
        if k < 1:
            raise UsageError(f"--samples must be at least 1, got {k}")
        return cls("majority", samples=k)

    @property
    def name(self) -> str:
        if self.method == "pacore":
            return f"pacore-{self.schedule.text()}"
        if self.method == "majority":
            return f"majority-{self.samples}"
        return "single"

    @property
    def first_round_size(self) -> int:
        """How many first-round trajectories a problem draws."""
        if self.method == "pacore":
            return self.schedule.rounds[0]
        return self.samples or 1

    def info(self) -> ArmInfo:
        schedule = self.schedule.text() if self.method != "majority" else None
        return ArmInfo(self.name, self.method, schedule, self.samples)


def generation_config(
    backend: Backend, params: GenerationParams, template: SynthesisTemplate, reference_order: ReferenceOrder = "shuffle"
) -> dict[str, Any]:
    """The settings every arm of a run shares, as stored (never credentials)."""
    return {
        "model": backend.model,
        "params": {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": params.seed,
            "stop": list(params.stop) if params.stop else None,
            "extra": dict(params.extra),
        },
        "template": {
            "origin": template.origin,
            "sha256": hashlib.sha256(template.source.encode("utf-8")).hexdigest(),
            "reference_order": reference_order,
        },
        # Where the model ran: informational only, a server may move between runs.
        "backend": _without_credentials(backend.name),
    }


def _without_credentials(text: str) -> str:
    return re.sub(r"//[^/@\s]*@", "//", text)


def _config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``name: old -> new`` for every shared setting that differs (the backend may)."""
    changes = []
    if stored.get("model") != current["model"]:
        changes.append(f"model {stored.get('model')} -> {current['model']}")
    old_params, new_params = stored.get("params", {}), current["params"]
    for key, value in new_params.items():
        if old_params.get(key) != value:
            changes.append(f"{key.replace('_', '-')} {old_params.get(key)} -> {value}")
    if stored.get("template", {}).get("sha256") != current["template"]["sha256"]:
        changes.append(f"template {stored.get('template', {}).get('origin')} -> {current['template']['origin']}")
    # Runs stored before the option existed used the shuffle.
    old_order = stored.get("template", {}).get("reference_order", "shuffle")
    if old_order != current["template"]["reference_order"]:
        changes.append(f"reference-order {old_order} -> {current['template']['reference_order']}")
    return changes


def stored_problem(problem: Problem, position: int) -> StoredProblem:
    return StoredProblem(problem.id, position, list(problem.messages), problem.answer, problem.kind)


@dataclass
class BatchProgress:
    """Live figures of a batch run, for progress displays."""

    arm: str
    #: Problems of the arm, done before this run included.
    total: int
    done: int = 0
    failed: int = 0
    #: Problems to work on in this run.
    todo: int = 0
    finished_now: int = 0
    correct: int = 0
    graded: int = 0
    in_flight: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.graded if self.graded else None

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def eta_s(self) -> float | None:
        if not self.finished_now:
            return None
        return (self.todo - self.finished_now) * self.elapsed_s / self.finished_now

    def count(self, result: ProblemResult) -> None:
        self.finished_now += 1
        if result.status == "done":
            self.done += 1
        else:
            self.failed += 1
        if result.status == "done" and result.correct is not None:
            self.graded += 1
            self.correct += int(result.correct)


@dataclass(frozen=True, slots=True)
class RunPlan:
    """What opening a run found and decided, for the one-line notes a CLI prints."""

    new_run: bool
    new_arm: bool
    done: int
    failed: int
    pending: int
    retry_failed: bool
    pool_size: int | None
    #: Where ``force`` moved a conflicting database, if it did.
    set_aside: Path | None = None


class _ProblemTracker:
    """Folds one problem's engine events into the shared progress figures."""

    def __init__(self, progress: BatchProgress) -> None:
        self.progress = progress
        #: Set while the engine adopts pooled trajectories: nothing is generated then.
        self.adopted = False
        self.in_flight = 0

    def expect(self, n: int) -> None:
        self.in_flight += n
        self.progress.in_flight += n

    def __call__(self, event: Event) -> None:
        if isinstance(event, RoundStarted) and not (self.adopted and event.round == 0):
            self.expect(event.k)
        elif isinstance(event, TrajectoryFinished) and not (self.adopted and event.round == 0):
            self.in_flight -= 1
            self.progress.in_flight -= 1
            self.progress.completion_tokens += event.trajectory.completion_tokens

    def close(self) -> None:
        self.progress.in_flight -= self.in_flight
        self.in_flight = 0


class BatchRun:
    """One invocation of a batch run. Use :meth:`open`, then :meth:`execute`, then :meth:`close`."""

    def __init__(
        self,
        store: RunStore,
        problems: list[Problem],
        arm: Arm,
        backend: Backend,
        params: GenerationParams,
        template: SynthesisTemplate,
        concurrency: int,
        plan: RunPlan,
        deadline: float | None = None,
        min_success: float | None = None,
        reference_order: ReferenceOrder = "shuffle",
    ) -> None:
        self.store = store
        self.problems = problems
        self.arm = arm
        self.backend = backend
        self.params = params
        self.template = template
        self.concurrency = concurrency
        self.plan = plan
        #: Seconds each problem may take (its pool sampling, if any, gets as long again).
        self.deadline = deadline
        self.min_success = min_success
        self.reference_order = reference_order
        self.draw_seed = params.seed if params.seed is not None else 0
        # Store access and grading run here, off the event loop: a commit waits for
        # the disk (fsync) and math-verify can take a few hundred milliseconds, which
        # would stall every backend call in flight. One thread keeps them in order.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pacore-store")
        statuses = store.statuses(arm.name)
        wanted = {"pending", "failed"} if plan.retry_failed else {"pending"}
        self.todo = [p for p in problems if statuses[p.id] in wanted]
        # Failed problems being retried count again only once they finish.
        self.progress = BatchProgress(
            arm=arm.name, total=len(problems), done=plan.done, failed=0 if plan.retry_failed else plan.failed,
            todo=len(self.todo),
        )  # fmt: skip

    @classmethod
    def open(
        cls,
        run_dir: str | Path,
        problems: Sequence[Problem],
        *,
        dataset_path: str | Path,
        arm: Arm,
        backend: Backend,
        params: GenerationParams | None = None,
        template: SynthesisTemplate | None = None,
        pool_size: int | None = None,
        concurrency: int = 4,
        retry_failed: bool = True,
        add_arm: bool = False,
        force: bool = False,
        deadline: float | None = None,
        min_success: float | None = None,
        reference_order: ReferenceOrder = "shuffle",
    ) -> BatchRun:
        """Open (or create) ``run_dir`` for ``arm``; refuse what does not fit it.

        ``deadline`` is in seconds per problem (filling its trajectory pool, if
        needed, gets as long again); ``min_success`` is the fraction of a
        coordinated round's trajectories (or of majority's samples) that must succeed.
        """
        problems = list(problems)
        if not problems:
            raise DatasetError(f"{dataset_path}: no problems to run")
        _check_unique_ids(problems)
        if concurrency < 1:
            raise UsageError(f"--concurrency must be at least 1, got {concurrency}")
        if pool_size is not None and pool_size < 1:
            raise UsageError(f"--pool-size must be at least 1, got {pool_size}")
        params = params or GenerationParams()
        template = template or SynthesisTemplate.default()
        config = generation_config(backend, params, template, reference_order)
        wanted = RunInfo(
            dataset_path=str(Path(dataset_path).resolve()),
            dataset_fingerprint=dataset_fingerprint(problems),
            problem_count=len(problems),
            config=config,
            pool_size=pool_size,
        )
        store = RunStore.open(run_dir, writer=True)
        try:
            moved = None
            conflict = _conflict(store, wanted, arm, add_arm)
            if conflict and not force:
                raise RunConflictError(conflict)
            if conflict:
                moved = store.reset()
            info = store.run_info()
            new_run = info is None
            if info is None:
                store.init_run(wanted, (stored_problem(p, i) for i, p in enumerate(problems)))
                info = wanted
            if info.pool_size is not None and arm.first_round_size > info.pool_size:
                raise UsageError(
                    f"{arm.name} draws {arm.first_round_size} first-round trajectories per problem "
                    f"but the pool of {run_dir} holds {info.pool_size}"
                )
            new_arm = arm.name not in {a.name for a in store.arms()}
            if new_arm:
                store.add_arm(arm.info(), (p.id for p in problems))
            counts = Counter(store.statuses(arm.name).values())
            plan = RunPlan(
                new_run=new_run,
                new_arm=new_arm,
                done=counts["done"],
                failed=counts["failed"],
                pending=counts["pending"],
                retry_failed=retry_failed,
                pool_size=info.pool_size,
                set_aside=moved,
            )
            return cls(
                store, problems, arm, backend, params, template, concurrency, plan, deadline, min_success,
                reference_order,
            )  # fmt: skip
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        self._worker.shutdown(wait=True)  # a commit under way finishes first
        self.store.close()

    def __enter__(self) -> BatchRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def execute(
        self, on_problem: Callable[[Problem, ProblemResult], None] | None = None
    ) -> ArmReport:
        """Solve every problem to do, ``concurrency`` at a time, committing each as it finishes."""
        self.progress.started = time.perf_counter()
        slots = asyncio.Semaphore(self.concurrency)

        async def one(problem: Problem) -> None:
            async with slots:
                result = await self._solve(problem)
            await self._off_loop(self.store.record, self.arm.name, result)
            self.progress.count(result)
            if on_problem:
                on_problem(problem, result)

        async with asyncio.TaskGroup() as group:
            for problem in self.todo:
                group.create_task(one(problem))
        return self.summary()

    async def _off_loop(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    def summary(self) -> ArmReport:
        """The arm's figures as they stand (the report's, without synthesis diagnostics)."""
        return arm_report(str(self.store.run_dir), self.arm.info(), self.store.results(self.arm.name, traces=False))

    # --- one problem ----------------------------------------------------

    async def _solve(self, problem: Problem) -> ProblemResult:
        started = time.perf_counter()
        tracker = _ProblemTracker(self.progress)
        trace: Result | None = None
        try:
            trace = await self._trace(problem, tracker)
        except PacoreError as exc:
            trace = exc.result or trace
            return _failed(problem, str(exc), trace, time.perf_counter() - started)
        except Exception as exc:  # one problem's unforeseen failure is recorded; the run goes on
            logger.debug("problem %s failed unexpectedly", problem.id, exc_info=True)
            return _failed(problem, f"unexpected {type(exc).__name__}: {exc}", None, time.perf_counter() - started)
        finally:
            tracker.close()
        answer = trace.answer
        correct = None
        if problem.answer is not None:
            correct = await self._off_loop(grade, answer, problem.answer, problem.kind)
        return ProblemResult(
            problem_id=problem.id,
            status="done",
            answer=answer,
            extracted=extract_answer(answer, problem.kind),
            correct=correct,
            prompt_tokens=trace.usage.prompt_tokens,
            completion_tokens=trace.usage.completion_tokens,
            calls=trace.usage.calls,
            wall_s=time.perf_counter() - started,
            trace=trace,
        )

    async def _trace(self, problem: Problem, tracker: _ProblemTracker) -> Result:
        first = await self._pool_draw(problem, tracker) if self.plan.pool_size else None
        arm = self.arm
        if arm.method == "pacore":
            tracker.adopted = first is not None
            return await asolve(
                problem.messages,
                schedule=arm.schedule,
                backend=self.backend,
                params=self.params,
                template=self.template,
                first_round=first,
                on_event=tracker,
                deadline=self.deadline,
                min_success=self.min_success,
                reference_order=self.reference_order,
            )
        if arm.method == "single" and first is None:
            return await asolve(
                problem.messages, schedule=arm.schedule, backend=self.backend, params=self.params,
                on_event=tracker, deadline=self.deadline,
            )  # fmt: skip
        started = time.perf_counter()
        if first is None:
            tracker.expect(arm.first_round_size)
            first = await self._sample(problem, arm.first_round_size, tracker)
        return self._sampled_trace(problem, first, time.perf_counter() - started)

    async def _sample(self, problem: Problem, n: int, tracker: _ProblemTracker, start: int = 0) -> list[Trajectory]:
        """``n`` first-round samples of ``problem``, within the deadline."""
        samples = asample(
            problem.messages, n, backend=self.backend, params=self.params, start=start, on_event=tracker
        )
        return await within_deadline(samples, self.deadline, lambda: "while sampling")

    def _sampled_trace(self, problem: Problem, samples: list[Trajectory], elapsed_s: float) -> Result:
        """The trace of ``single`` (from a pool) or ``majority``: one round of samples, no synthesis."""
        rnd = Round(
            index=0, k=len(samples), final=self.arm.method == "single", trajectories=samples
        )
        trace = Result(
            answer="",
            schedule=[],
            rounds=[rnd],
            usage=usage_of([rnd]),
            model=self.backend.model,
            backend=self.backend.name,
            seed=self.params.seed,
            elapsed_s=elapsed_s,
        )
        min_success = self.min_success if self.arm.method == "majority" else None
        why = too_few_succeeded(len(samples), rnd.succeeded, min_success, "samples")
        if why is not None:
            error = next((t.error for t in samples if t.error), "no sample ran")
            failure = RoundFailedError(f"{why}: {error}")
            failure.result = trace.model_copy(update={"error": str(failure)})
            raise failure
        if self.arm.method == "single":
            trace.answer = (samples[0].message or "").strip()
        else:
            voted, _count = majority_vote([t.message for t in samples], problem.kind)
            trace.answer = voted or ""
        return trace

    async def _pool_draw(self, problem: Problem, tracker: _ProblemTracker) -> list[Trajectory]:
        """A seeded draw of the arm's first-round size from the problem's pool, filling it first."""
        size = self.plan.pool_size
        assert size is not None
        pool = await self._off_loop(self.store.pool, problem.id)
        if len(pool) < size:
            start = max((t.index for t in pool), default=-1) + 1
            tracker.expect(size - len(pool))
            fresh = await self._sample(problem, size - len(pool), tracker, start)
            # Failed samples are not pooled: the next run generates them again.
            kept = [t for t in fresh if t.ok]
            await self._off_loop(self.store.add_pool, problem.id, kept)
            pool += kept
            if len(pool) < size:
                error = next(t.error for t in fresh if not t.ok)
                raise RoundFailedError(
                    f"trajectory pool: {len(fresh) - len(kept)} of {len(fresh)} samples failed "
                    f"({len(pool)} of {size} pooled; a rerun generates the rest): {error}"
                )
        k = self.arm.first_round_size
        rng = random.Random(f"pacore-pool:{self.draw_seed}:{problem.id}:{k}")
        return [t.model_copy(update={"index": i}) for i, t in enumerate(rng.sample(pool, k))]


def _failed(problem: Problem, reason: str, trace: Result | None, wall_s: float) -> ProblemResult:
    usage = trace.usage if trace is not None else None
    return ProblemResult(
        problem_id=problem.id,
        status="failed",
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        calls=usage.calls if usage else 0,
        wall_s=wall_s,
        error=reason,
        trace=trace,
    )


def _check_unique_ids(problems: list[Problem]) -> None:
    seen: dict[str, int] = {}
    for problem in problems:
        if problem.id in seen:
            raise DatasetError(
                f"problem id {problem.id!r} appears twice (lines {seen[problem.id]} and {problem.line}); "
                "ids must be unique to resume a run"
            )
        seen[problem.id] = problem.line


def _conflict(store: RunStore, wanted: RunInfo, arm: Arm, add_arm: bool) -> str | None:
    """Why ``store`` cannot take this command as it stands, or ``None``."""
    info = store.run_info()
    if info is None:
        return None
    where = store.run_dir
    fix = "use another --out, or --force to start over (the old results are kept aside)"
    if info.dataset_fingerprint != wanted.dataset_fingerprint:
        return (
            f"{where} holds a run of another data set ({info.problem_count} problems from "
            f"{info.dataset_path}); {fix}"
        )
    changes = _config_changes(info.config, wanted.config)
    if changes:
        return f"{where} was run with other settings ({'; '.join(changes)}); resume with the same options, or {fix}"
    if wanted.pool_size is not None and wanted.pool_size != info.pool_size:
        had = f"a pool of {info.pool_size}" if info.pool_size else "no trajectory pool"
        return f"{where} has {had}, not {wanted.pool_size}; omit --pool-size to use what is there, or {fix}"
    arms = [a.name for a in store.arms()]
    if arms and arm.name not in arms and info.pool_size is None and not add_arm:
        return (
            f"{where} holds {', '.join(arms)}, not {arm.name}; add --add-arm to evaluate {arm.name} "
            f"there too, or {fix}"
        )
    return None


async def run_dataset(
    run_dir: str | Path,
    problems: Sequence[Problem],
    *,
    dataset_path: str | Path,
    arm: Arm,
    backend: Backend,
    on_problem: Callable[[Problem, ProblemResult], None] | None = None,
    **options: Any,
) -> ArmReport:
    """Open, run and close a batch run (see :meth:`BatchRun.open` for ``options``)."""
    with BatchRun.open(
        run_dir, problems, dataset_path=dataset_path, arm=arm, backend=backend, **options
    ) as run:
        return await run.execute(on_problem)
