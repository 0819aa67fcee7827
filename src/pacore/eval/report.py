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

:func:`write_report` writes ``report.md``, ``report.html`` (self-contained,
the plot embedded) and ``accuracy_vs_ttc.png``.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pacore.eval.grading import grade, majority_vote
from pacore.errors import OutputError
from pacore.files import atomic_output, refuse_overwriting, write_atomic
from pacore.store import ArmInfo, ProblemResult, RunStore, StoredProblem, store_files
from pacore.trace import Result

MARKDOWN_NAME = "report.md"
HTML_NAME = "report.html"
PLOT_NAME = "accuracy_vs_ttc.png"
REPORT_NAMES = (MARKDOWN_NAME, HTML_NAME, PLOT_NAME)

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
    total_wall_s: float = 0.0
    failure_reasons: list[tuple[str, int]] = field(default_factory=list)
    synthesis: SynthesisStats | None = None
    #: Per graded problem: its accuracy over its graded repeats.
    problem_accuracies: list[float] = field(default_factory=list)

    @property
    def repeated(self) -> bool:
        """Whether some problem has more than one graded result."""
        return len(self.problem_accuracies) < self.graded

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
            "total_wall_s": self.total_wall_s,
            "failure_reasons": [{"reason": r, "count": n} for r, n in self.failure_reasons],
            "synthesis": self.synthesis.as_dict() if self.synthesis else None,
        }


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


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
        report.total_wall_s += result.wall_s or 0.0
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


def collect(run_dirs: Sequence[str | Path]) -> list[ArmReport]:
    """The figures of every arm of every run directory, in order."""
    reports: list[ArmReport] = []
    for run_dir in run_dirs:
        with RunStore.open(run_dir) as store:
            problems = {p.id: p for p in store.problems()}
            for arm in store.arms():
                traces = arm.method == "pacore"  # only synthesis diagnostics read traces
                results = store.results(arm.name, traces=traces)
                reports.append(arm_report(str(run_dir), arm, results, problems))
    return reports


# --- output -----------------------------------------------------------------


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
        "accuracy [95% CI]", "mean TTC tokens", "mean prompt tokens", "mean wall", "total wall",
    ]  # fmt: skip
    rows = [
        [
            arm.arm, arm.method, arm.setting, _problems_cell(arm), str(arm.answered),
            str(arm.failed) + (f" (+{arm.pending} pending)" if arm.pending else ""),
            _accuracy_cell(arm), _number(arm.mean_completion_tokens), _number(arm.mean_prompt_tokens),
            f"{_number(arm.mean_wall_s, 1)}s", f"{_number(arm.total_wall_s, 1)}s",
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


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)])


def _failures(arms: list[ArmReport]) -> list[tuple[str, str, int]]:
    return [(arm.arm, reason, count) for arm in arms for reason, count in arm.failure_reasons]


def render_markdown(arms: list[ArmReport], run_dirs: Sequence[str]) -> str:
    with_run = len(run_dirs) > 1
    parts = [
        "# PaCoRe evaluation report",
        "",
        f"Runs: {', '.join(f'`{d}`' for d in run_dirs)}",
        "",
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
    failures = _failures(arms)
    if failures:
        parts += ["", "## Failures", ""]
        parts += [f"- {arm}: {count} × {reason}" for arm, reason, count in failures]
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
"""


def render_html(arms: list[ArmReport], run_dirs: Sequence[str], plot_png: bytes | None) -> str:
    with_run = len(run_dirs) > 1
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>PaCoRe evaluation report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>PaCoRe evaluation report</h1>",
        f"<p>Runs: {html.escape(', '.join(run_dirs))}</p>",
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
    failures = _failures(arms)
    if failures:
        parts.append("<h2>Failures</h2><ul>")
        parts += [f"<li>{html.escape(f'{arm}: {count} × {reason}')}</li>" for arm, reason, count in failures]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_plot(arms: list[ArmReport], path: Path, with_run: bool) -> None:
    """Accuracy (95% interval bars) against mean effective TTC (log x), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    series: dict[str, list[ArmReport]] = {}
    for arm in arms:
        if arm.accuracy is not None and arm.mean_completion_tokens:
            label = f"{arm.method} ({arm.run})" if with_run else arm.method
            series.setdefault(label, []).append(arm)
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for label, points in series.items():
            points.sort(key=lambda a: a.mean_completion_tokens or 0)
            xs = [a.mean_completion_tokens for a in points]
            ys = [100 * (a.accuracy or 0) for a in points]
            # No interval (repeats of a single problem): no bar rather than one down to 0.
            intervals = [a.interval or (a.accuracy or 0.0,) * 2 for a in points]
            # Clamped: rounding can put a bound a hair past its point (matplotlib refuses that).
            errors = [
                [max(0.0, y - 100 * low) for y, (low, _) in zip(ys, intervals, strict=True)],
                [max(0.0, 100 * high - y) for y, (_, high) in zip(ys, intervals, strict=True)],
            ]
            axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=label)
            for arm, x, y in zip(points, xs, ys, strict=True):
                axes.annotate(arm.setting, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
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


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> tuple[list[ArmReport], ReportFiles]:
    """Collect every arm of ``run_dirs`` and write the three report files into ``out_dir``.

    ``out_dir`` defaults to the first run directory.
    """
    names = [str(d) for d in run_dirs]
    arms = collect(run_dirs)
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0])
    if out.exists() and not out.is_dir():
        raise OutputError(f"report output {out} is not a directory")
    files = ReportFiles(out / MARKDOWN_NAME, out / HTML_NAME, out / PLOT_NAME)
    inputs = store_files(out)
    for run_dir in run_dirs:
        with RunStore.open(run_dir) as store:
            inputs |= run_inputs(store, with_reports=False)
    for path in (files.markdown, files.html, files.plot):
        refuse_overwriting(path, inputs)
    render_plot(arms, files.plot, with_run=len(names) > 1)
    write_atomic(files.markdown, render_markdown(arms, names))
    write_atomic(files.html, render_html(arms, names, files.plot.read_bytes()))
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
