"""Reports over run directories: accuracy against test-time compute, and synthesis diagnostics.

For every arm of every run: accuracy with a 95% Wilson interval (over the
answered problems that have a ground truth), mean effective TTC (completion
tokens) and prompt tokens per answered problem, wall time and failures. For
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
from pacore.messages import last_user_text
from pacore.store import ArmInfo, ProblemResult, RunStore, StoredProblem
from pacore.trace import Result
from pacore.verifier import Judgement, Verifier

MARKDOWN_NAME = "report.md"
HTML_NAME = "report.html"
PLOT_NAME = "accuracy_vs_ttc.png"

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
    problems: int = 0
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
    spurious: SpuriousStats | None = None

    @property
    def accuracy(self) -> float | None:
        return _ratio(self.correct, self.graded)

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.correct, self.graded)

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
            "answered": self.answered,
            "failed": self.failed,
            "pending": self.pending,
            "graded": self.graded,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "ci_low": interval[0] if interval else None,
            "ci_high": interval[1] if interval else None,
            "mean_completion_tokens": self.mean_completion_tokens,
            "mean_prompt_tokens": self.mean_prompt_tokens,
            "mean_wall_s": self.mean_wall_s,
            "total_wall_s": self.total_wall_s,
            "failure_reasons": [{"reason": r, "count": n} for r, n in self.failure_reasons],
            "synthesis": self.synthesis.as_dict() if self.synthesis else None,
            "spurious": self.spurious.as_dict() if self.spurious else None,
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
    if arm.method == "pacore" and problems is not None:
        report.synthesis = SynthesisStats()
    for result in results:
        report.problems += 1
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
            if report.synthesis is not None and result.trace is not None:
                problem = problems[result.problem_id]  # type: ignore[index]  # set with synthesis
                if problem.ground_truth is not None:
                    _add_synthesis_stats(report.synthesis, result.trace, problem)
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
    return f"{percent(arm.accuracy)} [{percent(interval[0])}, {percent(interval[1])}] ({arm.correct}/{arm.graded})"


def summary_rows(arms: list[ArmReport], with_run: bool) -> tuple[list[str], list[list[str]]]:
    header = [
        "arm", "method", "schedule / k", "problems", "answered", "failed",
        "accuracy [95% CI]", "mean TTC tokens", "mean prompt tokens", "mean wall", "total wall",
    ]  # fmt: skip
    rows = [
        [
            arm.arm, arm.method, arm.setting, str(arm.problems), str(arm.answered),
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


def render_markdown(arms: list[ArmReport], run_dirs: Sequence[str]) -> str:
    with_run = len(run_dirs) > 1
    parts = [
        "# PaCoRe evaluation report",
        "",
        f"Runs: {', '.join(f'`{d}`' for d in run_dirs)}",
        "",
        "Accuracy is over answered problems with a ground truth, with a 95% Wilson interval. "
        "TTC tokens are the effective test-time compute: completion tokens of every call of a "
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
        "<p>Accuracy is over answered problems with a ground truth, with a 95% Wilson interval; "
        "TTC tokens are completion tokens of every call of a problem.</p>",
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
            intervals = [a.interval or (0.0, 0.0) for a in points]
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
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)


@dataclass(frozen=True, slots=True)
class ReportFiles:
    markdown: Path
    html: Path
    plot: Path


def write_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path | None = None, verifier: Verifier | None = None
) -> tuple[list[ArmReport], ReportFiles]:
    """Collect every arm of ``run_dirs`` and write the three report files into ``out_dir``.

    ``out_dir`` defaults to the first run directory; with ``verifier`` the
    report adds each arm's spurious correctness.
    """
    names = [str(d) for d in run_dirs]
    arms = collect(run_dirs, verifier)
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out / MARKDOWN_NAME, out / HTML_NAME, out / PLOT_NAME)
    render_plot(arms, files.plot, with_run=len(names) > 1)
    files.markdown.write_text(render_markdown(arms, names), encoding="utf-8")
    files.html.write_text(render_html(arms, names, files.plot.read_bytes()), encoding="utf-8")
    return arms, files
