"""Reports over run directories: the figures of :mod:`pacore.eval.figures` rendered.

:func:`write_report` writes ``report.md``, ``report.html`` (self-contained,
the plot embedded), ``accuracy_vs_ttc.png`` and ``report.csv`` (one row per
result). The report opens with what each run was: model, backend, settings,
data set, dates and pacore version; it closes with every problem's result.
Wall time is the run's real elapsed time, from the first result's start to
the last one's finish; the sum of per-problem times is shown apart (problems
run concurrently, so it is usually far larger).

The figures' names (:class:`ArmReport`, :func:`arm_report`, ...) are
re-exported here, where they were first defined.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pacore._extras import require
from pacore.errors import OutputError
from pacore.eval.figures import (
    CROSS_CHECK,
    PROBLEM_COLUMNS,
    Z_95,
    ArmReport,
    RunDetails,
    RunHeader,
    SpuriousStats,
    SynthesisStats,
    arm_report,
    collect,
    iso_time,
    problem_rows,
    ratio,
    repeat_interval,
    result_span,
    run_details,
    run_header,
    spurious_stats,
    wilson_interval,
)
from pacore.eval.grading import format_note_counts
from pacore.files import atomic_output, refuse_overwriting, write_atomic
from pacore.store import RunStore, store_files
from pacore.verifier import Verifier

__all__ = [
    "CROSS_CHECK", "PROBLEM_COLUMNS", "REPORT_NAMES", "Z_95", "ArmReport", "ReportFiles", "RunDetails",
    "RunHeader", "SpuriousStats", "SynthesisStats", "arm_report", "collect", "percent", "plot_points",
    "problem_rows", "render_csv", "render_html", "render_markdown", "render_plot", "repeat_interval",
    "result_span", "run_details", "run_header", "run_inputs", "spurious_stats", "summary_rows",
    "wilson_interval", "write_report",
]  # fmt: skip

MARKDOWN_NAME = "report.md"
HTML_NAME = "report.html"
PLOT_NAME = "accuracy_vs_ttc.png"
CSV_NAME = "report.csv"
REPORT_NAMES = (MARKDOWN_NAME, HTML_NAME, PLOT_NAME, CSV_NAME)

ACCURACY_NOTE = (
    "Accuracy is over answered problems with a ground truth. With one result per problem it is the "
    "proportion correct with a 95% Wilson interval; with repeats (answered and failed count results, "
    "problem × repeat) it is the mean over problems of each problem's accuracy over its repeats, with a "
    "95% normal-approximation interval over problems (mean ± 1.96·s/√n, s the standard deviation of "
    "the n per-problem accuracies)."
)


def _duration(seconds: float | None) -> str:
    """``"4m 58s"``; ``"n/a"`` for none."""
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def header_lines(header: RunHeader) -> list[tuple[str, str]]:
    """A run header as ``(label, value)`` pairs, in the order the report shows them."""
    return [
        ("model", header.model or "unknown"),
        ("backend", header.backend or "unknown"),
        ("settings", header.settings),
        ("data set", f"{header.dataset} ({header.problems} problems)"),
        ("run created", header.created_at or "unknown"),
        ("results", f"{iso_time(header.first_start) or 'none yet'} to {iso_time(header.last_finish) or 'none yet'}"),
        ("wall time", _duration(header.elapsed_s)),
        ("pacore version", header.pacore_version or "unknown"),
    ]


def percent(value: float | None) -> str:
    """A fraction as ``"12.3%"``, or ``"n/a"``."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _fraction(part: int, whole: int) -> str:
    return f"{part}/{whole} ({percent(ratio(part, whole))})" if whole else "n/a"


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
        (
            arm,
            [
                arm.arm,
                arm.method,
                arm.setting,
                _problems_cell(arm),
                str(arm.answered),
                str(arm.failed) + (f" (+{arm.pending} pending)" if arm.pending else ""),
                _accuracy_cell(arm),
                _number(arm.mean_completion_tokens),
                _number(arm.mean_prompt_tokens),
                f"{_number(arm.mean_wall_s, 1)}s",
                _duration(arm.elapsed_s),
                f"{_number(arm.sum_wall_s, 1)}s",
            ],
        )  # fmt: skip
        for arm in arms
    ]
    return _table(header, rows, with_run)


def not_judged_lines(arms: list[ArmReport], with_run: bool) -> list[str]:
    """Per arm with results graded incorrect without being judged: how many and why (none when no arm has)."""
    return [
        f"{_arm_name(arm, with_run)}: {arm.not_judged} of {arm.graded} graded results; "
        + format_note_counts(arm.not_judged_notes)
        for arm in arms
        if arm.not_judged
    ]


def synthesis_not_judged_lines(arms: list[ArmReport], with_run: bool) -> list[str]:
    """Per arm whose synthesis diagnostics graded messages incorrect without judging them: how many."""
    return [
        f"{_arm_name(arm, with_run)}: {stats.not_judged} messages"
        for arm in arms
        if (stats := arm.synthesis) is not None and stats.not_judged
    ]


def _arm_name(arm: ArmReport, with_run: bool) -> str:
    return f"{arm.arm} ({arm.run})" if with_run else arm.arm


def _markdown_notes(note: str, lines: list[str]) -> list[str]:
    """A note over its lines as a markdown list; nothing without lines."""
    return ["", note, "", *(f"- {line}" for line in lines)] if lines else []


def _html_notes(note: str, lines: list[str]) -> list[str]:
    """A note over its lines as an HTML list; nothing without lines."""
    if not lines:
        return []
    return [f"<p>{html.escape(note)}</p><ul>", *(f"<li>{html.escape(line)}</li>" for line in lines), "</ul>"]


def synthesis_rows(arms: list[ArmReport], with_run: bool) -> tuple[list[str], list[list[str]]]:
    header = [
        "arm", "synthesized outputs", "fixed the majority (when it was wrong)",
        "broke the majority (when it was right)", "emergent correctness (all inputs wrong)",
        "cross-checking",
    ]  # fmt: skip
    rows = [
        (
            arm,
            [
                arm.arm,
                str(stats.synthesized),
                _fraction(stats.fixed, stats.majority_wrong),
                _fraction(stats.broke, stats.majority_right),
                _fraction(stats.emergent_correct, stats.all_inputs_wrong),
                _fraction(stats.cross_checking, stats.synthesized),
            ],
        )  # fmt: skip
        for arm in arms
        if (stats := arm.synthesis) is not None
    ]
    return _table(header, rows, with_run)


def policy_rows(arms: list[ArmReport], with_run: bool) -> tuple[list[str], list[list[str]]]:
    """What the adaptive-compute policies did, per arm that ran one (no rows when none did)."""
    header = ["arm", "policy", "mean TTC tokens", "stopped trajectories / problem", "dropped messages / problem"]
    rows = [
        (
            arm,
            [
                arm.arm,
                arm.policy,
                _number(arm.mean_completion_tokens),
                _number(arm.stopped / arm.answered if arm.answered else None, 1),
                _number(arm.dropped / arm.answered if arm.answered else None, 1),
            ],
        )  # fmt: skip
        for arm in arms
        if arm.policy
    ]
    return _table(header, rows, with_run)


def spurious_rows(arms: list[ArmReport], with_run: bool) -> tuple[list[str], list[list[str]]]:
    header = ["arm", "correct answers judged", "derivation rejected (spurious correctness)", "no verdict"]
    rows = [
        (arm, [arm.arm, str(stats.judged), _fraction(stats.rejected, stats.judged), str(stats.unknown)])
        for arm in arms
        if (stats := arm.spurious) is not None
    ]
    return _table(header, rows, with_run)


def _table(
    header: list[str], rows: list[tuple[ArmReport, list[str]]], with_run: bool
) -> tuple[list[str], list[list[str]]]:
    """A table's header and rows, with a first "run" column when the report compares several runs."""
    if with_run:
        return ["run", *header], [[arm.run, *row] for arm, row in rows]
    return header, [row for _, row in rows]


NOT_JUDGED_NOTE = (
    "Graded incorrect without being judged (the answers could not be compared, so these count as wrong "
    "in the accuracy above):"
)
SYNTHESIS_NOT_JUDGED_NOTE = (
    "Trajectory messages these diagnostics graded incorrect without being judged (synthesized outputs and "
    "their inputs, each distinct one of a result once; counted as wrong above):"
)
POLICY_NOTE = (
    "Arms that ran an adaptive-compute policy (see docs/adaptive-compute.md), per answered problem; "
    "stopped trajectories' tokens count in the TTC, and on a pool the policy was replayed on round 1."
)
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
        parts += [f"- {label}: {value}" for label, value in header_lines(detail.header)]
        parts.append("")
    parts += [
        f"{ACCURACY_NOTE} TTC tokens are the effective test-time compute: completion tokens of every call of a "
        "problem (pooled trajectories a problem used included).",
        "",
        "## Accuracy and compute",
        "",
        _markdown_table(*summary_rows(arms, with_run)),
    ]
    parts += _markdown_notes(NOT_JUDGED_NOTE, not_judged_lines(arms, with_run))
    parts += ["", f"![accuracy vs effective TTC]({PLOT_NAME})"]
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
        parts += _markdown_notes(SYNTHESIS_NOT_JUDGED_NOTE, synthesis_not_judged_lines(arms, with_run))
    header, rows = policy_rows(arms, with_run)
    if rows:
        parts += ["", "## Adaptive compute", "", POLICY_NOTE, "", _markdown_table(header, rows)]
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
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
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
            f"<dt>{html.escape(label)}</dt><dd>{html.escape(value)}</dd>"
            for label, value in header_lines(detail.header)
        ]
        parts.append("</dl>")
    parts += [
        f"<p>{html.escape(ACCURACY_NOTE)} TTC tokens are completion tokens of every call of a problem.</p>",
        "<h2>Accuracy and compute</h2>",
        _html_table(*summary_rows(arms, with_run)),
    ]
    parts += _html_notes(NOT_JUDGED_NOTE, not_judged_lines(arms, with_run))
    if plot_png:
        encoded = base64.b64encode(plot_png).decode("ascii")
        parts.append(f"<img alt='accuracy vs effective TTC' src='data:image/png;base64,{encoded}'>")
    header, rows = synthesis_rows(arms, with_run)
    if rows:
        parts += ["<h2>Synthesis diagnostics</h2>", _html_table(header, rows)]
        parts += _html_notes(SYNTHESIS_NOT_JUDGED_NOTE, synthesis_not_judged_lines(arms, with_run))
    header, rows = policy_rows(arms, with_run)
    if rows:
        parts += ["<h2>Adaptive compute</h2>", f"<p>{html.escape(POLICY_NOTE)}</p>", _html_table(header, rows)]
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
            name = f"{arm.series} ({arm.run})" if with_run else arm.series
            label = arm.arm if len(group) > 1 or not arm.setting else arm.setting
            point = PlotPoint(arm, x, 100 * (arm.accuracy or 0), label, position)
            series.setdefault(name, []).append(point)
    order = {name: i for i, name in enumerate(dict.fromkeys(
        f"{a.series} ({a.run})" if with_run else a.series for a in plotted
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
