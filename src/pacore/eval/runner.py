"""Batch runs: a data set under one method, resumable, committed problem by problem.

A run directory holds one data set and one set of generation settings
(model, sampling parameters, template), evaluated under one or more *arms*:

- ``pacore`` with a schedule (every round through :func:`pacore.engine.asolve` with the run's open backend);
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
the seed, the repeat, the problem and the number drawn only, so ``pacore``
with K1 = k and ``majority`` with k see the very same trajectories.

Repeats (``repeats=R``): every problem is run R times per seed, each an
independent draw from the pool (or, without a pool, fresh samples with a
seed of its own), and reports average accuracy over them. Each repeat is a
result of its own, committed and resumed like a problem. On a pooled run,
another seed adds R more draws instead of being refused; the pool is reused.
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

from pacore.adaptive import ComputePolicy
from pacore.backends.base import Backend, GenerationParams
from pacore.engine import asample, asolve, check_policy, too_few_succeeded, within_deadline
from pacore.errors import DatasetError, PacoreError, RoundFailedError, RunConflictError, UsageError
from pacore.eval.choices import DEFAULT_SAMPLES, METHODS
from pacore.eval.datasets import Problem, dataset_fingerprint
from pacore.eval.figures import ArmReport, arm_report
from pacore.eval.grading import extract_answer, grade_verdict, majority_vote
from pacore.options import SolveOptions, policy_label
from pacore.prompts import SynthesisTemplate
from pacore.schedule import MAX_TRAJECTORIES_PER_ROUND, Schedule
from pacore.store import ArmInfo, ProblemResult, RepeatKey, RunInfo, RunStore, StoredProblem
from pacore.synthesis import ReferenceOrder
from pacore.trace import Event, Result, Round, RoundStarted, Trajectory, TrajectoryFinished, usage_of

logger = logging.getLogger(__name__)

#: Generation settings that only pick draws from a pool, so a pooled run accepts another value.
POOL_DRAW_SETTINGS = ("seed",)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Arm:
    """A method with its schedule or sample count (and, for ``pacore``, an adaptive-compute
    policy); build one with :meth:`build`."""

    method: str
    schedule: Schedule = Schedule(())
    samples: int | None = None
    #: ``None``: the paper's method.
    compute: ComputePolicy | None = None

    @classmethod
    def build(
        cls,
        method: str = "pacore",
        *,
        schedule: Schedule | str | None = None,
        samples: int | None = None,
        compute: ComputePolicy | None = None,
    ) -> Arm:
        method = method.strip().lower()
        if method not in METHODS:
            raise UsageError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        if method != "pacore" and schedule is not None:
            raise UsageError(f"--schedule is for --method pacore, not {method}")
        if compute is not None and compute.is_default:
            compute = None
        if method != "pacore" and compute is not None:
            raise UsageError(f"the adaptive-compute options are for --method pacore, not {method}")
        if method != "majority" and samples is not None:
            raise UsageError(f"--samples is for --method majority, not {method}")
        if method == "pacore":
            plan = Schedule.parse(schedule)
            if plan.is_passthrough:
                raise UsageError("--schedule off is one plain call: use --method single")
            return cls("pacore", plan, compute=compute)
        if method == "single":
            return cls("single")
        k = DEFAULT_SAMPLES if samples is None else samples
        if k < 1:
            raise UsageError(f"--samples must be at least 1, got {k}")
        if k > MAX_TRAJECTORIES_PER_ROUND:
            raise UsageError(f"--samples must be at most {MAX_TRAJECTORIES_PER_ROUND:,}, got {k}")
        return cls("majority", samples=k)

    @property
    def name(self) -> str:
        if self.method == "pacore":
            policy = f"+{policy_label(self.compute.model_dump(exclude_defaults=True))}" if self.compute else ""
            return f"pacore-{self.schedule.text()}{policy}"
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
        compute = self.compute.model_dump(exclude_defaults=True) if self.compute else None
        return ArmInfo(self.name, self.method, schedule, self.samples, compute=compute)


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


def _config_changes(stored: dict[str, Any], current: dict[str, Any], ignored: Sequence[str] = ()) -> list[str]:
    """``name: old -> new`` for every shared setting that differs (the backend may), but ``ignored`` params."""
    changes = []
    if stored.get("model") != current["model"]:
        changes.append(f"model {stored.get('model')} -> {current['model']}")
    old_params, new_params = stored.get("params", {}), current["params"]
    for key, value in new_params.items():
        if key not in ignored and old_params.get(key) != value:
            changes.append(f"{key.replace('_', '-')} {old_params.get(key)} -> {value}")
    if stored.get("template", {}).get("sha256") != current["template"]["sha256"]:
        changes.append(f"template {stored.get('template', {}).get('origin')} -> {current['template']['origin']}")
    # Runs stored before the option existed used the shuffle.
    old_order = stored.get("template", {}).get("reference_order", "shuffle")
    if old_order != current["template"]["reference_order"]:
        changes.append(f"reference-order {old_order} -> {current['template']['reference_order']}")
    return changes


@dataclass(frozen=True, slots=True)
class AnswerGrade:
    """What a batch run stores about an arm's answer besides the answer: its extraction and grade."""

    extracted: str | None
    #: ``None`` when the problem has no ground truth to grade against.
    correct: bool | None
    #: Why ``correct`` is ``False`` without the answers being compared (see :class:`~pacore.eval.grading.GradeVerdict`).
    note: str | None = None


def grade_answer(method: str, answer: str | None, ground_truth: str | None, kind: str = "auto") -> AnswerGrade:
    """The extraction and grade a batch run stores for ``answer``, an arm's final answer under ``method``.

    The one grading step of ``pacore run`` and ``pacore regrade``. A majority vote's
    answer (``method="majority"``) is an extracted answer already: it is graded as
    it is, not searched again for one. Without a ground truth nothing is graded.
    """
    voted = method == "majority"
    extracted = (answer or None) if voted else extract_answer(answer, kind)
    if ground_truth is None:
        return AnswerGrade(extracted, None)
    verdict = grade_verdict(answer, ground_truth, kind, extracted=voted)
    return AnswerGrade(extracted, verdict.correct, verdict.note)


def stored_problem(problem: Problem, position: int) -> StoredProblem:
    return StoredProblem(problem.id, position, list(problem.messages), problem.answer, problem.kind)


def repeat_seed(seed: int, repeat: int) -> int:
    """The seed of repeat ``repeat`` of a series seeded ``seed``: ``seed`` itself for repeat 0.

    Hashed rather than offset, so the repeats of seed 1 never replay those of seed 2.
    """
    if repeat == 0:
        return seed
    digest = hashlib.sha256(f"pacore-repeat:{seed}:{repeat}".encode("ascii")).digest()
    return int.from_bytes(digest[:4], "big") % 2**31


@dataclass(frozen=True, slots=True)
class Repeat:
    """One unit of work: repeat ``index`` of ``problem`` in the series of ``seed``."""

    problem: Problem
    seed: int
    index: int

    @property
    def label(self) -> str:
        return self.problem.id if self.index == 0 else f"{self.problem.id} (repeat {self.index})"

    @property
    def key(self) -> RepeatKey:
        """The key of this unit's result in the store."""
        return self.problem.id, self.seed, self.index


@dataclass
class BatchProgress:
    """Live figures of a batch run, for progress displays."""

    arm: str
    #: Problem repeats this command asks for (problems x repeats), done before this run included.
    total: int
    #: Problem repeats to work on in this run.
    todo: int = 0
    repeats: int = 1
    started: float = field(default_factory=time.perf_counter)
    #: Results so far, those of earlier runs included.
    done: int = 0
    failed: int = 0
    #: This run's figures: results finished, correct and graded, calls under way, tokens generated.
    finished_now: int = 0
    correct: int = 0
    graded: int = 0
    in_flight: int = 0
    completion_tokens: int = 0

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
    #: Repeats per problem this command asks for, and the seed of their series.
    repeats: int = 1
    seed: int = 0


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
        pool_params: GenerationParams | None = None,
        reference_order: ReferenceOrder = "shuffle",
    ) -> None:
        self.store = store
        self.problems = problems
        self.arm = arm
        #: What every problem passes to the engine; a repeat changes its seed and params. Its
        #: deadline bounds each problem (its pool sampling, if any, gets as long again).
        self.options = SolveOptions(
            schedule=arm.schedule, params=params, template=template, min_success=min_success, deadline=deadline,
            reference_order=reference_order, compute=arm.compute,
        )  # fmt: skip
        #: Pool top-ups sample as the run's first command did, whatever seed draws from the pool now.
        self.pool_params = pool_params or params
        self.pool_compute = _pool_policy(arm.compute)
        self.backend = backend
        self.concurrency = concurrency
        self.plan = plan
        # Filling a problem's pool happens once, whichever of its repeats gets there first.
        self._pool_locks: dict[str, asyncio.Lock] = {}
        # Store access and grading run here, off the event loop: a commit waits for
        # the disk (fsync) and math-verify can take a few hundred milliseconds, which
        # would stall every backend call in flight. One thread keeps them in order.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pacore-store")
        statuses = store.statuses(arm.name)
        wanted = {"pending", "failed"} if plan.retry_failed else {"pending"}
        self.todo = [
            unit for unit in _repeats(problems, plan.seed, plan.repeats)
            if statuses[unit.key] in wanted
        ]  # fmt: skip
        # Failed problems being retried count again only once they finish.
        self.progress = BatchProgress(
            arm=arm.name, total=len(problems) * plan.repeats, todo=len(self.todo), repeats=plan.repeats,
            done=plan.done, failed=0 if plan.retry_failed else plan.failed,
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
        repeats: int = 1,
        reference_order: ReferenceOrder = "shuffle",
    ) -> BatchRun:
        """Open (or create) ``run_dir`` for ``arm``; refuse what does not fit it.

        ``deadline`` is in seconds per problem repeat (filling its trajectory pool,
        if needed, gets as long again); ``min_success`` is the fraction of a
        coordinated round's trajectories (or of majority's samples) that must
        succeed; ``repeats`` is how many independent draws (or fresh runs) of
        each problem this seed's series holds.
        """
        problems = list(problems)
        if not problems:
            raise DatasetError(f"{dataset_path}: no problems to run")
        _check_unique_ids(problems)
        if concurrency < 1:
            raise UsageError(f"--concurrency must be at least 1, got {concurrency}")
        if pool_size is not None and not 1 <= pool_size <= MAX_TRAJECTORIES_PER_ROUND:
            raise UsageError(f"--pool-size must be from 1 to {MAX_TRAJECTORIES_PER_ROUND:,}, got {pool_size}")
        if repeats < 1:
            raise UsageError(f"--repeats must be at least 1, got {repeats}")
        params = params or GenerationParams()
        if arm.compute is not None:  # refused once here, not as a failure of every problem
            check_policy(arm.compute, arm.schedule, params)
        seed = params.seed if params.seed is not None else 0
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
            _check_pooled_policy(arm, (info or wanted).pool_size, run_dir)
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
            ids = [p.id for p in problems]
            if new_arm:
                store.add_arm(arm.info(), ids, seed=seed, repeats=repeats)
            else:
                store.add_repeats(arm.name, ids, seed=seed, repeats=repeats)
            statuses = store.statuses(arm.name)
            counts = Counter(statuses[u.key] for u in _repeats(problems, seed, repeats))
            plan = RunPlan(
                new_run=new_run,
                new_arm=new_arm,
                done=counts["done"],
                failed=counts["failed"],
                pending=counts["pending"],
                retry_failed=retry_failed,
                pool_size=info.pool_size,
                set_aside=moved,
                repeats=repeats,
                seed=seed,
            )
            pool_params = params.with_seed(info.config.get("params", {}).get("seed"))
            return cls(
                store, problems, arm, backend, params, template, concurrency, plan, deadline, min_success,
                pool_params, reference_order,
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

    async def execute(self, on_problem: Callable[[Problem, ProblemResult], None] | None = None) -> ArmReport:
        """Solve every problem repeat to do, ``concurrency`` at a time, committing each as it finishes."""
        self.progress.started = time.perf_counter()
        slots = asyncio.Semaphore(self.concurrency)

        async def one(unit: Repeat) -> None:
            async with slots:
                result = await self._solve(unit)
            await self._off_loop(self.store.record, self.arm.name, result)
            self.progress.count(result)
            if on_problem:
                on_problem(unit.problem, result)

        async with asyncio.TaskGroup() as group:
            for unit in self.todo:
                group.create_task(one(unit))
        return self.summary()

    async def _off_loop(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    def summary(self) -> ArmReport:
        """The arm's figures as they stand (the report's, without synthesis diagnostics)."""
        return arm_report(str(self.store.run_dir), self.arm.info(), self.store.results(self.arm.name, traces=False))

    # --- one problem ----------------------------------------------------

    async def _solve(self, unit: Repeat) -> ProblemResult:
        problem = unit.problem
        started = time.perf_counter()
        tracker = _ProblemTracker(self.progress)
        trace: Result | None = None
        try:
            trace = await self._trace(unit, tracker)
        except PacoreError as exc:
            trace = exc.result or trace
            return _failed(unit, str(exc), trace, time.perf_counter() - started)
        except Exception as exc:  # one problem's unforeseen failure is recorded; the run goes on
            logger.debug("problem %s failed unexpectedly", unit.label, exc_info=True)
            return _failed(unit, f"unexpected {type(exc).__name__}: {exc}", None, time.perf_counter() - started)
        finally:
            tracker.close()
        answer = trace.answer
        grade = await self._off_loop(grade_answer, self.arm.method, answer, problem.answer, problem.kind)
        return ProblemResult(
            problem_id=problem.id,
            status="done",
            seed=unit.seed,
            repeat=unit.index,
            answer=answer,
            extracted=grade.extracted,
            correct=grade.correct,
            grade_note=grade.note,
            trace=trace,
            prompt_tokens=trace.usage.prompt_tokens,
            completion_tokens=trace.usage.completion_tokens,
            calls=trace.usage.calls,
            wall_s=time.perf_counter() - started,
        )

    def _params(self, unit: Repeat) -> GenerationParams:
        """The sampling parameters of a repeat: repeat 0 keeps the command's seed, later ones get their own."""
        params = self.options.params
        if params.seed is None:
            return params  # unseeded calls differ anyway
        return params.with_seed(repeat_seed(params.seed, unit.index))

    async def _trace(self, unit: Repeat, tracker: _ProblemTracker) -> Result:
        problem = unit.problem
        params = self._params(unit)
        first = await self._pool_draw(unit, tracker) if self.plan.pool_size else None
        arm = self.arm
        if arm.method == "pacore":
            tracker.adopted = first is not None
            # Unseeded repeats still shuffle their references each their own way.
            options = self.options.replace(params=params, seed=repeat_seed(unit.seed, unit.index))
            return await asolve(
                problem.messages, backend=self.backend, first_round=first, on_event=tracker, **options.as_kwargs()
            )
        if arm.method == "single" and first is None:
            options = self.options.replace(params=params)
            return await asolve(problem.messages, backend=self.backend, on_event=tracker, **options.as_kwargs())
        started = time.perf_counter()
        if first is None:
            tracker.expect(arm.first_round_size)
            first = await self._sample(problem, arm.first_round_size, tracker, params)
        return self._sampled_trace(problem, first, time.perf_counter() - started, params)

    async def _sample(
        self,
        problem: Problem,
        n: int,
        tracker: _ProblemTracker,
        params: GenerationParams,
        start: int = 0,
        compute: ComputePolicy | None = None,
    ) -> list[Trajectory]:
        """``n`` first-round samples of ``problem``, within the deadline."""
        samples = asample(
            problem.messages, n, backend=self.backend, params=params, start=start, on_event=tracker, compute=compute
        )
        return await within_deadline(samples, self.options.deadline, lambda: "while sampling")

    def _sampled_trace(
        self, problem: Problem, samples: list[Trajectory], elapsed_s: float, params: GenerationParams
    ) -> Result:
        """The trace of ``single`` (from a pool) or ``majority``: one round of samples, no synthesis."""
        rnd = Round(index=0, k=len(samples), final=self.arm.method == "single", trajectories=samples)
        trace = Result(
            answer="",
            schedule=[],
            rounds=[rnd],
            usage=usage_of([rnd]),
            model=self.backend.model,
            backend=self.backend.name,
            seed=params.seed,
            elapsed_s=elapsed_s,
        )
        min_success = self.options.min_success if self.arm.method == "majority" else None
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

    async def _pool_draw(self, unit: Repeat, tracker: _ProblemTracker) -> list[Trajectory]:
        """A seeded draw of the arm's first-round size from the problem's pool, filling it first."""
        problem = unit.problem
        lock = self._pool_locks.setdefault(problem.id, asyncio.Lock())
        async with lock:
            pool = await self._filled_pool(problem, tracker)
        k = self.arm.first_round_size
        # Repeat 0 keeps the draw runs made before repeats existed.
        key = f"pacore-pool:{unit.seed}:{problem.id}:{k}" + (f":{unit.index}" if unit.index else "")
        rng = random.Random(key)
        return [t.model_copy(update={"index": i}) for i, t in enumerate(rng.sample(pool, k))]

    async def _filled_pool(self, problem: Problem, tracker: _ProblemTracker) -> list[Trajectory]:
        size = self.plan.pool_size
        assert size is not None
        pool = await self._off_loop(self.store.pool, problem.id)
        if len(pool) < size:
            start = max((t.index for t in pool), default=-1) + 1
            tracker.expect(size - len(pool))
            fresh = await self._sample(problem, size - len(pool), tracker, self.pool_params, start, self.pool_compute)
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
        return pool


def _check_pooled_policy(arm: Arm, pool_size: int | None, run_dir: str | Path) -> None:
    """Quorum and budget cut running calls: on a pool's finished trajectories they would do nothing."""
    policy = arm.compute
    if pool_size is None or policy is None:
        return
    live_only = [flag for flag, on in (("--quorum", policy.quorum), ("--budget-tokens", policy.budget_tokens)) if on]
    if live_only:
        raise UsageError(
            f"{' and '.join(live_only)} cannot be replayed on the trajectory pool of {run_dir}: "
            "run such an arm in a run directory without --pool-size"
        )


def _pool_policy(policy: ComputePolicy | None) -> ComputePolicy | None:
    """How a pool is sampled for an arm: keeping per-token confidences when the arm's policy reads
    them (keep-top, early stop), so the engine can replay the policy on the pool offline."""
    if policy is None or not policy.wants_confidence:
        return None
    return ComputePolicy(
        confidence=True, top_logprobs=policy.top_logprobs, window=policy.window, keep_token_confidences=True
    )


def _repeats(problems: Sequence[Problem], seed: int, repeats: int) -> list[Repeat]:
    """The work of one command, problem by problem."""
    return [Repeat(problem, seed, index) for problem in problems for index in range(repeats)]


def _failed(unit: Repeat, reason: str, trace: Result | None, wall_s: float) -> ProblemResult:
    usage = trace.usage if trace is not None else None
    return ProblemResult(
        problem_id=unit.problem.id,
        status="failed",
        seed=unit.seed,
        repeat=unit.index,
        error=reason,
        trace=trace,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        calls=usage.calls if usage else 0,
        wall_s=wall_s,
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
            f"{where} holds a run of another data set ({info.problem_count} problems from {info.dataset_path}); {fix}"
        )
    # On a pooled run another seed only draws other subsets: more repeats, not a conflict.
    changes = _config_changes(info.config, wanted.config, POOL_DRAW_SETTINGS if info.pool_size else ())
    if changes:
        return f"{where} was run with other settings ({'; '.join(changes)}); resume with the same options, or {fix}"
    if wanted.pool_size is not None and wanted.pool_size != info.pool_size:
        had = f"a pool of {info.pool_size}" if info.pool_size else "no trajectory pool"
        return f"{where} has {had}, not {wanted.pool_size}; omit --pool-size to use what is there, or {fix}"
    arms = [a.name for a in store.arms()]
    if arms and arm.name not in arms and info.pool_size is None and not add_arm:
        return (
            f"{where} holds {', '.join(arms)}, not {arm.name}; add --add-arm to evaluate {arm.name} there too, or {fix}"
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
    with BatchRun.open(run_dir, problems, dataset_path=dataset_path, arm=arm, backend=backend, **options) as run:
        return await run.execute(on_problem)
