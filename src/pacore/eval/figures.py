"""The figures of run directories: accuracy against test-time compute, and synthesis diagnostics.

Pure computation over a run's stored results (no text, no files written);
:mod:`pacore.eval.report` renders these figures as markdown, HTML, a plot and CSV.

For every arm of every run: accuracy with a 95% interval (over the answered
problems that have a ground truth), mean effective TTC (completion tokens) and
prompt tokens per answered problem, wall time and failures, and how many
answers were graded incorrect without being compared (their grade notes:
comparison cut, answer too heavy for sympy...). With repeats
(several results per problem), accuracy is the mean over problems of each
problem's accuracy over its repeats, and the interval a normal approximation
over problems (see :func:`repeat_interval`); with one result per problem it
is the plain proportion with a Wilson interval. For
PaCoRe arms, the synthesis diagnostics over every synthesized
trajectory (every round after the first) of graded problems:

- *fixed* / *broke*: the synthesis was right where the majority answer of its
  input messages was wrong / wrong where that majority was right;
- *emergent correctness*: the synthesis was right although every input
  message was wrong (voting can never do that);
- *cross-checking*: the synthesis refers to the references by number
  ("Reference 3", "ref 2", "Reference #1");
- *not judged*: the trajectory messages (synthesized outputs and their
  inputs) these diagnostics graded wrong without comparing their answers with
  the ground truth (each distinct message of a result once).

With a verifier (:mod:`pacore.verifier`), every arm also gets its *spurious
correctness* (R-Align): the share of correct answers whose derivation the
verifier rejects.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pacore.eval.grading import GradeVerdict, grade_verdict, majority_vote
from pacore.messages import last_user_text
from pacore.options import policy_label
from pacore.store import ArmInfo, ProblemResult, RunInfo, RunStore, StoredProblem
from pacore.trace import Result
from pacore.verifier import Judgement, Verifier

# Two-sided 95% normal quantile.
Z_95 = 1.959963984540054

CROSS_CHECK = re.compile(r"\b(?:references?|refs?\.?)\s*(?:responses?\s*)?#?\s*\d+", re.IGNORECASE)


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion (``None`` when ``n`` is 0)."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def repeat_interval(problem_accuracies: Sequence[float], z: float = Z_95) -> tuple[float, float] | None:
    """A normal-approximation interval of the mean of per-problem accuracies.

    ``mean ± z·s/√n`` with ``s`` the sample standard deviation of the ``n``
    per-problem accuracies, clamped to [0, 1]: problems are the independent
    units, the repeats of one problem are not (``None`` below two problems).
    """
    n = len(problem_accuracies)
    if n < 2:
        return None
    mean = sum(problem_accuracies) / n
    variance = sum((a - mean) ** 2 for a in problem_accuracies) / (n - 1)
    half = z * math.sqrt(variance / n)
    return max(0.0, mean - half), min(1.0, mean + half)


@dataclass
class SynthesisStats:
    """Synthesis diagnostics of one PaCoRe arm."""

    synthesized: int = 0
    majority_wrong: int = 0
    fixed: int = 0
    majority_right: int = 0
    broke: int = 0
    all_inputs_wrong: int = 0
    emergent_correct: int = 0
    cross_checking: int = 0
    #: Trajectory messages (synthesized outputs and their inputs; each distinct one of a result once)
    #: graded wrong without their answers being compared: the counts above took them as wrong.
    not_judged: int = 0

    def as_dict(self) -> dict[str, Any]:
        counts = asdict(self)
        rates = {rate: ratio(counts[part], counts[whole]) for rate, (part, whole) in _SYNTHESIS_RATES.items()}
        return {**counts, **rates}


#: The rates of :meth:`SynthesisStats.as_dict`, each a count over the count it is a share of.
_SYNTHESIS_RATES = {
    "fixed_rate": ("fixed", "majority_wrong"),
    "broke_rate": ("broke", "majority_right"),
    "emergent_correctness_rate": ("emergent_correct", "all_inputs_wrong"),
    "cross_checking_frequency": ("cross_checking", "synthesized"),
}


@dataclass
class SpuriousStats:
    """Correct answers of one arm as a verifier judged their derivations."""

    judged: int = 0
    rejected: int = 0
    #: Correct answers the verifier gave no verdict on (left out of the rate).
    unknown: int = 0

    @property
    def rate(self) -> float | None:
        return ratio(self.rejected, self.judged)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spurious_correctness": self.rate}


@dataclass
class ArmReport:
    """The figures of one arm of one run."""

    run: str
    arm: str
    method: str
    schedule: str | None
    samples: int | None
    #: Distinct problems; the counts below are of results (problem repeats).
    problems: int = 0
    results: int = 0
    #: Most results of one problem (the repeats asked for, over every seed).
    repeats: int = 0
    answered: int = 0
    failed: int = 0
    pending: int = 0
    graded: int = 0
    correct: int = 0
    #: Means over answered problems (``None`` when none is answered).
    mean_completion_tokens: float | None = None
    mean_prompt_tokens: float | None = None
    mean_wall_s: float | None = None
    #: Per-problem wall times added up (problems overlap: not the run's duration).
    sum_wall_s: float = 0.0
    #: When the arm's first result started and its last one finished (UTC).
    first_start: datetime | None = None
    last_finish: datetime | None = None
    failure_reasons: list[tuple[str, int]] = field(default_factory=list)
    synthesis: SynthesisStats | None = None
    #: Per graded problem: its accuracy over its graded repeats.
    problem_accuracies: list[float] = field(default_factory=list)
    #: The arm's adaptive-compute policy, its non-default fields (``None``: the paper's method).
    compute: dict[str, Any] | None = None
    #: Trajectories the policy stopped early (early stop, quorum, budget), over every result.
    stopped: int = 0
    #: Messages keep-top left out of synthesis prompts, over every result.
    dropped: int = 0

    @property
    def repeated(self) -> bool:
        """Whether some problem has more than one graded result."""
        return len(self.problem_accuracies) < self.graded

    spurious: SpuriousStats | None = None
    #: Results graded incorrect without the answers being compared (counted wrong in the accuracy),
    #: and their most common grade notes.
    not_judged: int = 0
    not_judged_notes: list[tuple[str, int]] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        if not self.repeated:
            return ratio(self.correct, self.graded)
        return sum(self.problem_accuracies) / len(self.problem_accuracies)

    @property
    def interval_method(self) -> str | None:
        if not self.graded:
            return None
        return "normal approximation over problems" if self.repeated else "wilson"

    @property
    def interval(self) -> tuple[float, float] | None:
        if not self.repeated:
            return wilson_interval(self.correct, self.graded)
        return repeat_interval(self.problem_accuracies)

    @property
    def elapsed_s(self) -> float | None:
        """Real elapsed time: first start to last finish (``None`` before any result)."""
        if self.first_start is None or self.last_finish is None:
            return None
        return (self.last_finish - self.first_start).total_seconds()

    @property
    def policy(self) -> str:
        """The adaptive-compute policy as a label (``keep-top=0.5+early-stop``); empty for none."""
        return policy_label(self.compute) if self.compute else ""

    @property
    def setting(self) -> str:
        """The schedule or sample count (and policy), as shown in tables and on the plot."""
        if self.method == "majority":
            return f"k={self.samples}"
        return " +".join(filter(None, (self.schedule or "", self.policy)))

    @property
    def series(self) -> str:
        """The plot's line this arm is a point of: its method, and policy if any."""
        return f"{self.method} +{self.policy}" if self.policy else self.method

    def as_dict(self) -> dict[str, Any]:
        interval = self.interval
        return {
            "run": self.run,
            "arm": self.arm,
            "method": self.method,
            "schedule": self.schedule,
            "samples": self.samples,
            "compute": self.compute,
            "stopped_trajectories": self.stopped,
            "dropped_messages": self.dropped,
            "problems": self.problems,
            "results": self.results,
            "repeats": self.repeats,
            "answered": self.answered,
            "failed": self.failed,
            "pending": self.pending,
            "graded": self.graded,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "ci_low": interval[0] if interval else None,
            "ci_high": interval[1] if interval else None,
            "interval_method": self.interval_method,
            "mean_completion_tokens": self.mean_completion_tokens,
            "mean_prompt_tokens": self.mean_prompt_tokens,
            "mean_wall_s": self.mean_wall_s,
            "wall_s": self.elapsed_s,
            "sum_problem_wall_s": self.sum_wall_s,
            "first_start": iso_time(self.first_start),
            "last_finish": iso_time(self.last_finish),
            "failure_reasons": [{"reason": r, "count": n} for r, n in self.failure_reasons],
            "not_judged": self.not_judged,
            "not_judged_notes": [{"note": note, "count": n} for note, n in self.not_judged_notes],
            "synthesis": self.synthesis.as_dict() if self.synthesis else None,
            "spurious": self.spurious.as_dict() if self.spurious else None,
        }


def ratio(part: int, whole: int) -> float | None:
    """``part / whole``, ``None`` when ``whole`` is 0."""
    return part / whole if whole else None


def iso_time(moment: datetime | None) -> str | None:
    """A moment as ISO 8601 to the second, ``None`` for none."""
    return moment.isoformat(timespec="seconds") if moment is not None else None


def result_span(result: ProblemResult) -> tuple[datetime, datetime] | None:
    """When a result started and finished: it was recorded at its finish, ``wall_s`` after its start."""
    if result.status == "pending" or not result.updated_at:
        return None
    finish = datetime.fromisoformat(result.updated_at)
    if finish.tzinfo is None:
        finish = finish.replace(tzinfo=UTC)
    return finish - timedelta(seconds=result.wall_s or 0.0), finish


class _Grader:
    """``grade`` for one problem, cached: diagnostics grade the same messages several times."""

    def __init__(self, problem: StoredProblem) -> None:
        assert problem.ground_truth is not None
        self.ground_truth = problem.ground_truth
        self.kind = problem.kind
        self.cache: dict[tuple[str | None, bool], GradeVerdict] = {}

    def __call__(self, text: str | None, *, extracted: bool = False) -> bool:
        """Whether ``text`` (with ``extracted``: an answer already extracted, a majority vote's) is right."""
        key = (text, extracted)
        if key not in self.cache:
            self.cache[key] = grade_verdict(text, self.ground_truth, self.kind, extracted=extracted)
        return self.cache[key].correct

    def not_judged(self, texts: Iterable[str | None]) -> int:
        """How many of the distinct messages ``texts`` were graded wrong without being compared."""
        return sum(1 for text in set(texts) if (verdict := self.cache.get((text, False))) and verdict.note is not None)


def arm_report(
    run: str,
    arm: ArmInfo,
    results: Iterable[ProblemResult],
    problems: dict[str, StoredProblem] | None = None,
) -> ArmReport:
    """The figures of one arm, read in one pass over its results.

    Synthesis diagnostics need the traces and the ``problems`` (for their
    ground truths); without ``problems`` they are left out.
    """
    report = ArmReport(
        run=run, arm=arm.name, method=arm.method, schedule=arm.schedule, samples=arm.samples, compute=arm.compute
    )
    completion_tokens = prompt_tokens = wall_s = 0.0
    reasons: Counter[str] = Counter()
    not_judged: Counter[str] = Counter()
    per_problem: Counter[str] = Counter()
    grades: dict[str, list[bool]] = {}
    if arm.method == "pacore" and problems is not None:
        report.synthesis = SynthesisStats()
    for result in results:
        per_problem[result.problem_id] += 1
        report.results += 1
        report.sum_wall_s += result.wall_s or 0.0
        span = result_span(result)
        if span is not None:
            start, finish = span
            report.first_start = min(start, report.first_start or start)
            report.last_finish = max(finish, report.last_finish or finish)
        if result.status == "pending":
            report.pending += 1
        elif result.status == "failed":
            report.failed += 1
            reasons[result.error or "unknown error"] += 1
        else:
            report.answered += 1
            completion_tokens += result.completion_tokens
            prompt_tokens += result.prompt_tokens
            wall_s += result.wall_s or 0.0
            if result.correct is not None:
                report.graded += 1
                report.correct += int(result.correct)
                grades.setdefault(result.problem_id, []).append(result.correct)
                if result.grade_note is not None and not result.correct:
                    not_judged[result.grade_note] += 1
            if result.trace is not None:
                report.stopped += sum(1 for rnd in result.trace.rounds for t in rnd.trajectories if t.stopped)
                report.dropped += sum(len(rnd.dropped) for rnd in result.trace.rounds)
            if report.synthesis is not None and result.trace is not None:
                problem = problems[result.problem_id]  # type: ignore[index]  # set with synthesis
                if problem.ground_truth is not None:
                    _add_synthesis_stats(report.synthesis, result.trace, problem)
    report.problems = len(per_problem)
    report.repeats = max(per_problem.values(), default=0)
    report.problem_accuracies = [sum(g) / len(g) for g in grades.values()]
    if report.answered:
        report.mean_completion_tokens = completion_tokens / report.answered
        report.mean_prompt_tokens = prompt_tokens / report.answered
        report.mean_wall_s = wall_s / report.answered
    report.failure_reasons = reasons.most_common(3)
    report.not_judged = not_judged.total()
    report.not_judged_notes = not_judged.most_common(3)
    return report


def _add_synthesis_stats(stats: SynthesisStats, trace: Result, problem: StoredProblem) -> None:
    grader = _Grader(problem)
    messages: list[str | None] = []  # every trajectory message graded (the majority answer is none)
    for previous, rnd in zip(trace.rounds, trace.rounds[1:], strict=False):
        by_index = {t.index: t.message for t in previous.trajectories}
        inputs = [by_index.get(index) for round_index, index in rnd.references if round_index == previous.index]
        inputs = [m for m in inputs if m]
        if not inputs:
            continue
        voted, _ = majority_vote(inputs, problem.kind)
        majority_right = grader(voted, extracted=True)
        all_wrong = not any(grader(m) for m in inputs)
        messages += inputs
        for trajectory in rnd.trajectories:
            if not trajectory.ok:
                continue
            right = grader(trajectory.message)
            messages.append(trajectory.message)
            stats.synthesized += 1
            if majority_right:
                stats.majority_right += 1
                stats.broke += int(not right)
            else:
                stats.majority_wrong += 1
                stats.fixed += int(right)
            if all_wrong:
                stats.all_inputs_wrong += 1
                stats.emergent_correct += int(right)
            stats.cross_checking += int(bool(CROSS_CHECK.search(trajectory.text)))
    stats.not_judged += grader.not_judged(messages)


def collect(run_dirs: Sequence[str | Path], verifier: Verifier | None = None) -> list[ArmReport]:
    """The figures of every arm of every run directory, in order (spurious correctness with ``verifier``)."""
    reports: list[ArmReport] = []
    for run_dir in run_dirs:
        with RunStore.open(run_dir) as store:
            problems = {p.id: p for p in store.problems()}
            for arm in store.arms():
                traces = arm.method == "pacore"  # only synthesis diagnostics read traces
                results = store.results(arm.name, traces=traces)
                report = arm_report(str(run_dir), arm, results, problems)
                if verifier is not None:
                    report.spurious = spurious_stats(store.results(arm.name, traces=False), problems, verifier)
                reports.append(report)
    return reports


@dataclass(frozen=True)
class RunHeader:
    """What one run was: model, backend, settings, data set, dates and pacore version."""

    run: str
    model: str
    backend: str
    settings: str
    dataset: str
    problems: int
    created_at: str
    pacore_version: str
    first_start: datetime | None
    last_finish: datetime | None

    @property
    def elapsed_s(self) -> float | None:
        if self.first_start is None or self.last_finish is None:
            return None
        return (self.last_finish - self.first_start).total_seconds()


def _settings_text(info: RunInfo) -> str:
    config = info.config
    params = config.get("params") or {}
    parts = [f"{name} {value}" for name, value in params.items() if value not in (None, {}, [])]
    if (template := config.get("template")) and template.get("origin"):
        parts.append(f"template {template['origin']}")
    # Settings other branches add (reference order...) appear as they are stored.
    parts += [
        f"{name.replace('_', ' ')} {value}" for name, value in sorted(config.items())
        if name not in ("model", "backend", "params", "template") and isinstance(value, str | int | float)
    ]  # fmt: skip
    if info.pool_size:
        parts.append(f"pool {info.pool_size} trajectories per problem")
    return ", ".join(parts) or "defaults"


def run_header(store: RunStore, arms: Sequence[ArmReport]) -> RunHeader:
    """The header of ``store``'s run; its dates span the results of ``arms`` (its arms' figures)."""
    info = store.run_info()
    if info is None:
        return RunHeader(str(store.run_dir), "", "", "not started", "", 0, "", "", None, None)
    starts = [a.first_start for a in arms if a.first_start is not None]
    finishes = [a.last_finish for a in arms if a.last_finish is not None]
    model = info.config.get("model")
    if not model:  # none asked for: the one the backend named in its answers
        row = store.db.execute(
            "SELECT json_extract(trace_json, '$.model') FROM results WHERE trace_json IS NOT NULL LIMIT 1"
        ).fetchone()
        model = f"{row[0]} (as the backend named it)" if row and row[0] else ""
    return RunHeader(
        run=str(store.run_dir),
        model=str(model),
        backend=str(info.config.get("backend") or ""),
        settings=_settings_text(info),
        dataset=info.dataset_path,
        problems=info.problem_count,
        created_at=info.created_at,
        pacore_version=info.pacore_version,
        first_start=min(starts, default=None),
        last_finish=max(finishes, default=None),
    )


PROBLEM_COLUMNS = [
    "arm", "problem", "seed", "repeat", "status", "extracted answer", "ground truth", "grade",
    "completion tokens", "prompt tokens", "time (s)", "error",
]  # fmt: skip


def problem_rows(store: RunStore) -> list[list[str]]:
    """One row per result of every arm of ``store`` (cells as text, in :data:`PROBLEM_COLUMNS` order)."""
    truths = {p.id: p.ground_truth for p in store.problems()}
    rows = []
    for arm in store.arms():
        for result in store.results(arm.name, traces=False):
            grade_text = "" if result.correct is None else ("correct" if result.correct else "wrong")
            if result.grade_note is not None and not result.correct:
                grade_text += f" (not judged: {result.grade_note})"
            rows.append([
                arm.name, result.problem_id, str(result.seed), str(result.repeat), result.status,
                result.extracted or "", truths.get(result.problem_id) or "", grade_text,
                str(result.completion_tokens), str(result.prompt_tokens),
                f"{result.wall_s:.1f}" if result.wall_s is not None else "", result.error or "",
            ])  # fmt: skip
    return rows


@dataclass
class RunDetails:
    """A run's header and per-problem rows, for the report's first and last sections."""

    header: RunHeader
    rows: list[list[str]]


def run_details(run_dirs: Sequence[str | Path], arms: Sequence[ArmReport]) -> list[RunDetails]:
    details = []
    for run_dir in dict.fromkeys(run_dirs):  # a run named twice is described once
        with RunStore.open(run_dir) as store:
            own = [a for a in arms if a.run == str(run_dir)]
            details.append(RunDetails(run_header(store, own), problem_rows(store)))
    return details


def spurious_stats(
    results: Iterable[ProblemResult], problems: dict[str, StoredProblem], verifier: Verifier
) -> SpuriousStats:
    """Ask ``verifier`` about the derivation of every correct answer (one batch, cached)."""
    correct = [(problems[r.problem_id], r.answer or "") for r in results if r.status == "done" and r.correct]
    items = [Judgement(last_user_text(p.messages), answer, p.ground_truth or "") for p, answer in correct]
    verdicts = verifier.verify_many(items)
    return SpuriousStats(
        judged=sum(v is not None for v in verdicts),
        rejected=sum(v is False for v in verdicts),
        unknown=sum(v is None for v in verdicts),
    )
