"""Reports over run directories: accuracy against test-time compute, and synthesis diagnostics.

For every arm of every run: accuracy with a 95% interval (over the answered
problems that have a ground truth), mean effective TTC (completion tokens) and
prompt tokens per answered problem, wall time and failures. With repeats
(several results per problem), accuracy is the mean over problems of each
problem's accuracy over its repeats, and the interval a normal approximation
over problems (see :func:`repeat_interval`); with one result per problem it
is the plain proportion with a Wilson interval. For
PaCoRe arms, the report's synthesis diagnostics over every synthesized
trajectory (every round after the first) of graded problems:

- *fixed* / *broke*: the synthesis was right where the majority answer of its
  input messages was wrong / wrong where that majority was right;
- *emergent correctness*: the synthesis was right although every input
  message was wrong (voting can never do that);
- *cross-checking*: the synthesis refers to the references by number
  ("Reference 3", "ref 2", "Reference #1").

With a verifier (:mod:`pacore.verifier`), every arm also gets its *spurious
correctness* (R-Align): the share of correct answers whose derivation the
verifier rejects.

:func:`write_report` writes ``report.md``, ``report.html`` (self-contained,
the plot embedded), ``accuracy_vs_ttc.png`` and ``report.csv`` (one row per
result). The report opens with what each run was: model, backend, settings,
data set, dates and pacore version; it closes with every problem's result.
Wall time is the run's real elapsed time, from the first result's start to
the last one's finish; the sum of per-problem times is shown apart (problems
run concurrently, so it is usually far larger).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pacore._extras import require
from pacore.errors import OutputError
from pacore.eval.grading import grade, majority_vote
from pacore.files import atomic_output, refuse_overwriting, write_atomic
from pacore.messages import last_user_text
from pacore.store import ArmInfo, ProblemResult, RunInfo, RunStore, StoredProblem, store_files
from pacore.trace import Result
from pacore.verifier import Judgement, Verifier

MARKDOWN_NAME = "report.md"
HTML_NAME = "report.html"
PLOT_NAME = "accuracy_vs_ttc.png"
CSV_NAME = "report.csv"
REPORT_NAMES = (MARKDOWN_NAME, HTML_NAME, PLOT_NAME, CSV_NAME)

# Two-sided 95% normal quantile.
Z_95 = 1.959963984540054

ACCURACY_NOTE = (
    "Accuracy is over answered problems with a ground truth. With one result per problem it is the "
    "proportion correct with a 95% Wilson interval; with repeats (answered and failed count results, "
    "problem × repeat) it is the mean over problems of each problem's accuracy over its repeats, with a "
    "95% normal-approximation interval over problems (mean ± 1.96·s/√n, s the standard deviation of "
    "the n per-problem accuracies)."
)

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

    @property
    def fixed_rate(self) -> float | None:
        return _ratio(self.fixed, self.majority_wrong)

    @property
    def broke_rate(self) -> float | None:
        return _ratio(self.broke, self.majority_right)

    @property
    def emergent_rate(self) -> float | None:
        return _ratio(self.emergent_correct, self.all_inputs_wrong)

    @property
    def cross_checking_rate(self) -> float | None:
        return _ratio(self.cross_checking, self.synthesized)

    def as_dict(self) -> dict[str, Any]:
        rates = {
            "fixed_rate": self.fixed_rate,
            "broke_rate": self.broke_rate,
            "emergent_correctness_rate": self.emergent_rate,
            "cross_checking_frequency": self.cross_checking_rate,
        }
        return {**asdict(self), **rates}


@dataclass
class SpuriousStats:
    """Correct answers of one arm as a verifier judged their derivations."""

    judged: int = 0
    rejected: int = 0
    #: Correct answers the verifier gave no verdict on (left out of the rate).
    unknown: int = 0

    @property
    def rate(self) -> float | None:
        return _ratio(self.rejected, self.judged)

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

    @property
    def repeated(self) -> bool:
        """Whether some problem has more than one graded result."""
        return len(self.problem_accuracies) < self.graded
    spurious: SpuriousStats | None = None

    @property
    def accuracy(self) -> float | None:
        if not self.repeated:
            return _ratio(self.correct, self.graded)
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
    def setting(self) -> str:
        """The schedule or sample count, as shown in tables and on the plot."""
        if self.method == "majority":
            return f"k={self.samples}"
        return self.schedule or ""

    def as_dict(self) -> dict[str, Any]:
        interval = self.interval
        return {
            "run": self.run,
            "arm": self.arm,
            "method": self.method,
            "schedule": self.schedule,
            "samples": self.samples,
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
            "first_start": _iso(self.first_start),
            "last_finish": _iso(self.last_finish),
            "failure_reasons": [{"reason": r, "count": n} for r, n in self.failure_reasons],
            "synthesis": self.synthesis.as_dict() if self.synthesis else None,
            "spurious": self.spurious.as_dict() if self.spurious else None,
        }


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _iso(moment: datetime | None) -> str | None:
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
        self.cache: dict[str | None, bool] = {}

    def __call__(self, text: str | None) -> bool:
        if text not in self.cache:
            self.cache[text] = bool(text) and grade(text, self.ground_truth, self.kind)
        return self.cache[text]


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
    report = ArmReport(run=run, arm=arm.name, method=arm.method, schedule=arm.schedule, samples=arm.samples)
    completion_tokens = prompt_tokens = wall_s = 0.0
    reasons: Counter[str] = Counter()
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
    return report


def _add_synthesis_stats(stats: SynthesisStats, trace: Result, problem: StoredProblem) -> None:
    grader = _Grader(problem)
    for previous, rnd in zip(trace.rounds, trace.rounds[1:], strict=False):
        by_index = {t.index: t.message for t in previous.trajectories}
        inputs = [by_index.get(index) for round_index, index in rnd.references if round_index == previous.index]
        inputs = [m for m in inputs if m]
        if not inputs:
            continue
        voted, _ = majority_vote(inputs, problem.kind)
        majority_right = grader(voted)
        all_wrong = not any(grader(m) for m in inputs)
        for trajectory in rnd.trajectories:
            if not trajectory.ok:
                continue
            right = grader(trajectory.message)
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

    def lines(self) -> list[tuple[str, str]]:
        """``(label, value)`` pairs, in the order the report shows them."""
        return [
            ("model", self.model or "unknown"),
            ("backend", self.backend or "unknown"),
            ("settings", self.settings),
            ("data set", f"{self.dataset} ({self.problems} problems)"),
            ("run created", self.created_at or "unknown"),
            ("results", f"{_iso(self.first_start) or 'none yet'} to {_iso(self.last_finish) or 'none yet'}"),
            ("wall time", _duration(self.elapsed_s)),
            ("pacore version", self.pacore_version or "unknown"),
        ]


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


# --- output -----------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    """``"4m 58s"``; ``"n/a"`` for none."""
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def percent(value: float | None) -> str:
    """A fraction as ``"12.3%"``, or ``"n/a"``."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _fraction(part: int, whole: int) -> str:
    return f"{part}/{whole} ({percent(_ratio(part, whole))})" if whole else "n/a"


def _accuracy_cell(arm: ArmReport) -> str:
    interval = arm.interval
    if interval is None:
        return "n/a"
    counts = f"{arm.correct}/{arm.graded}" + (f" over {len(arm.problem_accuracies)} problems" if arm.repeated else "")
    return f"{percent(arm.accuracy)} [{percent(interval[0])}, {percent(interval[1])}] ({counts})"


def _problems_cell(arm: ArmReport) -> str:
    return f"{arm.problems} × {arm.repeats} repeats" if arm.repeats > 1 else str(arm.problems)


def summary_rows(arms: list[ArmReport], with_run: bool) -> tuple[list[str], list[list[str]]]:
    header = [
        "arm", "method", "schedule / k", "problems", "answered", "failed",
        "accuracy [95% CI]", "mean TTC tokens", "mean prompt tokens", "mean time per problem",
        "wall time (first start to last finish)", "sum of problem times",
    ]  # fmt: skip
    rows = [
        [
            arm.arm, arm.method, arm.setting, _problems_cell(arm), str(arm.answered),
            str(arm.failed) + (f" (+{arm.pending} pending)" if arm.pending else ""),
            _accuracy_cell(arm), _number(arm.mean_completion_tokens), _number(arm.mean_prompt_tokens),
            f"{_number(arm.mean_wall_s, 1)}s", _duration(arm.elapsed_s), f"{_number(arm.sum_wall_s, 1)}s",
        ]  # fmt: skip
        for arm in arms
    ]
    if with_run:
        header.insert(0, "run")
        for arm, row in zip(arms, rows, strict=True):
            row.insert(0, arm.run)
    return header, rows


def synthesis_rows(arms: list[ArmReport], with_run: bool) -> tuple[list[str], list[list[str]]]:
    header = [
        "arm", "synthesized outputs", "fixed the majority (when it was wrong)",
        "broke the majority (when it was right)", "emergent correctness (all inputs wrong)",
        "cross-checking",
    ]  # fmt: skip
    rows = []
    for arm in arms:
        stats = arm.synthesis
        if stats is None:
            continue
        row = [
            arm.arm, str(stats.synthesized), _fraction(stats.fixed, stats.majority_wrong),
            _fraction(stats.broke, stats.majority_right),
            _fraction(stats.emergent_correct, stats.all_inputs_wrong),
            _fraction(stats.cross_checking, stats.synthesized),
        ]  # fmt: skip
        if with_run:
            row.insert(0, arm.run)
        rows.append(row)
    if with_run:
        header.insert(0, "run")
    return header, rows


def spurious_rows(arms: list[ArmReport], with_run: bool) -> tuple[list[str], list[list[str]]]:
    header = ["arm", "correct answers judged", "derivation rejected (spurious correctness)", "no verdict"]
    rows = []
    for arm in arms:
        stats = arm.spurious
        if stats is None:
            continue
        row = [arm.arm, str(stats.judged), _fraction(stats.rejected, stats.judged), str(stats.unknown)]
        if with_run:
            row.insert(0, arm.run)
        rows.append(row)
    if with_run:
        header.insert(0, "run")
    return header, rows


SPURIOUS_NOTE = (
    "Correct answers whose derivation the verifier rejects (R-Align's spurious correctness); "
    "answers it gave no verdict on are left out of the share."
)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)])


def _failures(arms: list[ArmReport]) -> list[tuple[str, str, int]]:
    return [(arm.arm, reason, count) for arm in arms for reason, count in arm.failure_reasons]


def _problem_table(details: Sequence[RunDetails]) -> tuple[list[str], list[list[str]]]:
    if len(details) == 1:
        return PROBLEM_COLUMNS, details[0].rows
    return ["run", *PROBLEM_COLUMNS], [[d.header.run, *row] for d in details for row in d.rows]


def render_csv(details: Sequence[RunDetails]) -> str:
    """Every result of every run, one row each (with a ``run`` column)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", *PROBLEM_COLUMNS])
    writer.writerows([d.header.run, *row] for d in details for row in d.rows)
    return buffer.getvalue()


def _generated_line() -> str:
    from pacore import __version__

    return f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} by pacore {__version__}. Times are UTC."


def render_markdown(arms: list[ArmReport], run_dirs: Sequence[str], details: Sequence[RunDetails] = ()) -> str:
    with_run = len(run_dirs) > 1
    parts = [
        "# PaCoRe evaluation report",
        "",
        f"Runs: {', '.join(f'`{d}`' for d in run_dirs)}",
        "",
        _generated_line(),
        "",
    ]
    for detail in details:
        parts += [f"## Run `{detail.header.run}`", ""]
        parts += [f"- {label}: {value}" for label, value in detail.header.lines()]
        parts.append("")
    parts += [
        f"{ACCURACY_NOTE} TTC tokens are the effective test-time compute: completion tokens of every call of a "
        "problem (pooled trajectories a problem used included).",
        "",
        "## Accuracy and compute",
        "",
        _markdown_table(*summary_rows(arms, with_run)),
        "",
        f"![accuracy vs effective TTC]({PLOT_NAME})",
    ]
    header, rows = synthesis_rows(arms, with_run)
    if rows:
        parts += [
            "",
            "## Synthesis diagnostics",
            "",
            "Over every synthesized trajectory of graded problems; the majority is the voted "
            "answer of the messages the synthesis was given.",
            "",
            _markdown_table(header, rows),
        ]
    header, rows = spurious_rows(arms, with_run)
    if rows:
        parts += ["", "## Spurious correctness", "", SPURIOUS_NOTE, "", _markdown_table(header, rows)]
    failures = _failures(arms)
    if failures:
        parts += ["", "## Failures", ""]
        parts += [f"- {arm}: {count} × {reason}" for arm, reason, count in failures]
    if details:
        parts += ["", "## Per-problem results", "", f"Also in `{CSV_NAME}`.", ""]
        parts.append(_markdown_table(*_problem_table(details)))
    return "\n".join(parts) + "\n"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; }
dl.run { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dl.run dt { font-weight: 600; }
dl.run dd { margin: 0; }
"""


def render_html(
    arms: list[ArmReport], run_dirs: Sequence[str], plot_png: bytes | None, details: Sequence[RunDetails] = ()
) -> str:
    with_run = len(run_dirs) > 1
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>PaCoRe evaluation report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>PaCoRe evaluation report</h1>",
        f"<p>Runs: {html.escape(', '.join(run_dirs))}</p>",
        f"<p>{html.escape(_generated_line())}</p>",
    ]
    for detail in details:
        parts.append(f"<h2>Run {html.escape(detail.header.run)}</h2><dl class='run'>")
        parts += [
            f"<dt>{html.escape(label)}</dt><dd>{html.escape(value)}</dd>" for label, value in detail.header.lines()
        ]
        parts.append("</dl>")
    parts += [
        f"<p>{html.escape(ACCURACY_NOTE)} TTC tokens are completion tokens of every call of a problem.</p>",
        "<h2>Accuracy and compute</h2>",
        _html_table(*summary_rows(arms, with_run)),
    ]
    if plot_png:
        encoded = base64.b64encode(plot_png).decode("ascii")
        parts.append(f"<img alt='accuracy vs effective TTC' src='data:image/png;base64,{encoded}'>")
    header, rows = synthesis_rows(arms, with_run)
    if rows:
        parts += ["<h2>Synthesis diagnostics</h2>", _html_table(header, rows)]
    header, rows = spurious_rows(arms, with_run)
    if rows:
        parts += ["<h2>Spurious correctness</h2>", f"<p>{html.escape(SPURIOUS_NOTE)}</p>", _html_table(header, rows)]
    failures = _failures(arms)
    if failures:
        parts.append("<h2>Failures</h2><ul>")
        parts += [f"<li>{html.escape(f'{arm}: {count} × {reason}')}</li>" for arm, reason, count in failures]
        parts.append("</ul>")
    if details:
        parts += ["<h2>Per-problem results</h2>", _html_table(*_problem_table(details))]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


#: One marker per series, so series that overlap stay apart.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: Tied points are spread along x by this factor per step (log scale: the same width everywhere).
_TIE_STEP = 1.04


@dataclass(frozen=True)
class PlotPoint:
    arm: ArmReport
    #: Where the point is drawn: its mean TTC, moved a little when it ties another point.
    x: float
    y: float
    label: str
    #: Which of the points tied at its position it is (0 for a point alone); labels are stacked by it.
    tie: int


def plot_points(arms: Sequence[ArmReport], with_run: bool) -> dict[str, list[PlotPoint]]:
    """The plotted points by series, in TTC order; tied points (same TTC and accuracy at the plot's
    resolution) are spread symmetrically by small deterministic x offsets, in the order of ``arms``."""
    plotted = [a for a in arms if a.accuracy is not None and a.mean_completion_tokens]
    ties: dict[tuple[float, float], list[ArmReport]] = {}
    for arm in plotted:
        key = (round(math.log10(arm.mean_completion_tokens or 1), 2), round(100 * (arm.accuracy or 0), 1))
        ties.setdefault(key, []).append(arm)
    series: dict[str, list[PlotPoint]] = {}
    for group in ties.values():
        for position, arm in enumerate(group):
            x = (arm.mean_completion_tokens or 0) * _TIE_STEP ** (position - (len(group) - 1) / 2)
            name = f"{arm.method} ({arm.run})" if with_run else arm.method
            label = arm.arm if len(group) > 1 or not arm.setting else arm.setting
            point = PlotPoint(arm, x, 100 * (arm.accuracy or 0), label, position)
            series.setdefault(name, []).append(point)
    order = {name: i for i, name in enumerate(dict.fromkeys(
        f"{a.method} ({a.run})" if with_run else a.method for a in plotted
    ))}  # fmt: skip
    return {name: sorted(series[name], key=lambda p: p.x) for name in sorted(series, key=order.__getitem__)}


def render_plot(arms: list[ArmReport], path: Path, with_run: bool) -> None:
    """Accuracy (95% interval bars) against mean effective TTC (log x), one line and marker per
    method; every point labelled, tied points spread apart (see :func:`plot_points`)."""
    require("eval", "matplotlib", feature="the report's figure")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    series = plot_points(arms, with_run)
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for number, (label, points) in enumerate(series.items()):
            xs = [p.x for p in points]
            ys = [p.y for p in points]
            # No interval (repeats of a single problem): no bar rather than one down to 0.
            intervals = [p.arm.interval or (p.arm.accuracy or 0.0,) * 2 for p in points]
            # Clamped: rounding can put a bound a hair past its point (matplotlib refuses that).
            errors = [
                [max(0.0, y - 100 * low) for y, (low, _) in zip(ys, intervals, strict=True)],
                [max(0.0, 100 * high - y) for y, (_, high) in zip(ys, intervals, strict=True)],
            ]
            marker = _MARKERS[number % len(_MARKERS)]
            axes.errorbar(xs, ys, yerr=errors, marker=marker, capsize=3, label=label, alpha=0.85)
            for point in points:
                # Labels of tied points are stacked so each stays readable.
                axes.annotate(point.label, (point.x, point.y), textcoords="offset points",
                              xytext=(5, 4 + 10 * point.tie), fontsize=8)  # fmt: skip
        axes.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
        axes.xaxis.set_major_formatter(plain)
        low, high = axes.get_xlim()
        # Within one decade there may be no major tick at all: label the minor ones.
        axes.xaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())
        axes.set_xlabel("mean effective TTC per problem (completion tokens, log scale)")
        axes.set_ylabel("accuracy (%, 95% interval)")
        axes.set_title("Accuracy vs test-time compute")
        axes.grid(True, which="both", alpha=0.3)
        if series:
            axes.legend()
        else:
            axes.text(0.5, 0.5, "no graded answers yet", ha="center", va="center", transform=axes.transAxes)
        figure.tight_layout()
        with atomic_output(path, "wb") as file:
            figure.savefig(file, format="png")
    finally:
        plt.close(figure)


@dataclass(frozen=True, slots=True)
class ReportFiles:
    markdown: Path
    html: Path
    plot: Path
    csv: Path


def write_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path | None = None, verifier: Verifier | None = None
) -> tuple[list[ArmReport], ReportFiles]:
    """Collect every arm of ``run_dirs`` and write the report files (markdown, HTML, plot, CSV) into ``out_dir``.

    ``out_dir`` defaults to the first run directory; with ``verifier`` the
    report adds each arm's spurious correctness.
    """
    names = [str(d) for d in run_dirs]
    arms = collect(run_dirs, verifier)
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0])
    if out.exists() and not out.is_dir():
        raise OutputError(f"report output {out} is not a directory")
    files = ReportFiles(out / MARKDOWN_NAME, out / HTML_NAME, out / PLOT_NAME, out / CSV_NAME)
    inputs = store_files(out)
    for run_dir in run_dirs:
        with RunStore.open(run_dir) as store:
            inputs |= run_inputs(store, with_reports=False)
    for path in (files.markdown, files.html, files.plot, files.csv):
        refuse_overwriting(path, inputs)
    details = run_details(run_dirs, arms)
    render_plot(arms, files.plot, with_run=len(names) > 1)
    write_atomic(files.csv, render_csv(details))
    write_atomic(files.markdown, render_markdown(arms, names, details))
    write_atomic(files.html, render_html(arms, names, files.plot.read_bytes(), details))
    return arms, files


def run_inputs(store: RunStore, *, with_reports: bool = True) -> dict[Path, str]:
    """The files no output may replace: the run's own files (and report), and its data set."""
    run_dir = store.run_dir
    inputs = store_files(run_dir)
    if with_reports:
        inputs |= {run_dir / name: f"a report file of run directory {run_dir}" for name in REPORT_NAMES}
    info = store.run_info()
    if info is not None:
        inputs[Path(info.dataset_path)] = f"the data set of run directory {run_dir}"
    return inputs
