"""What ``pacore run`` shows while it works and when it is done: a live status line on a terminal,
a line per finished problem elsewhere, and the lines that open and close a run.

Imported when a run starts: declaring the ``run`` command (every ``pacore --help``) needs none of it.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TextIO

from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from pacore.cli.results import interval_text, results_unit
from pacore.eval import report
from pacore.eval.datasets import Problem
from pacore.eval.runner import BatchProgress, RunPlan
from pacore.progress import format_duration
from pacore.store import ProblemResult


class LiveBatchDisplay:
    """A status line redrawn in place; failures are printed above it."""

    def __init__(self, console: Console, progress: BatchProgress) -> None:
        self.progress = progress
        self.spinner = Spinner("dots", style="cyan")
        self.live = Live(
            console=console, get_renderable=self.render, refresh_per_second=4, transient=True,
            redirect_stdout=False, redirect_stderr=False,
        )  # fmt: skip

    def render(self) -> RenderableType:
        p = self.progress
        eta = p.eta_s
        grid = Table.grid(padding=(0, 1))
        grid.add_row(
            self.spinner,
            Text(p.arm, style="bold"),
            ProgressBar(total=max(p.total, 1), completed=p.done + p.failed, width=24),
            Text(
                f"{p.done + p.failed}/{p.total} {results_unit(p.repeats)}"
                + (f" ({p.failed} failed)" if p.failed else "")
            ),
            Text(f"· {p.in_flight} in flight"),
            Text(f"· {p.completion_tokens:,} tokens", style="green"),
            Text(f"· accuracy {report.percent(p.accuracy)}"),
            Text(f"· ETA {format_duration(eta)}" if eta is not None else "· ETA ...", style="dim"),
        )
        return grid

    def problem_finished(self, problem: Problem, result: ProblemResult) -> None:
        if result.status == "failed":
            label = _label(problem, result, self.progress)
            self.live.console.print(f"{label}: failed: {result.error}", highlight=False, markup=False)

    def __enter__(self) -> LiveBatchDisplay:
        self.live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.live.stop()


class LineBatchDisplay:
    """One plain line per finished problem, for logs and pipes."""

    def __init__(self, file: TextIO, progress: BatchProgress) -> None:
        self.file = file
        self.progress = progress

    def problem_finished(self, problem: Problem, result: ProblemResult) -> None:
        p = self.progress
        if result.status == "failed":
            outcome = f"failed: {result.error}"
        else:
            outcome = {True: "correct", False: "wrong", None: "answered"}[result.correct]
        eta = p.eta_s
        print(
            f"[{p.done + p.failed}/{p.total}] {_label(problem, result, p)}: {outcome} · {result.completion_tokens:,} tokens "
            f"· {format_duration(result.wall_s or 0.0)} · accuracy {report.percent(p.accuracy)}"
            + (f" · ETA {format_duration(eta)}" if eta is not None else ""),
            file=self.file,
            flush=True,
        )

    def __enter__(self) -> LineBatchDisplay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


BatchDisplay = LiveBatchDisplay | LineBatchDisplay


def _label(problem: Problem, result: ProblemResult, progress: BatchProgress) -> str:
    return problem.id if progress.repeats == 1 else f"{problem.id} #{result.repeat}"


def open_batch_display(progress: BatchProgress, quiet: bool) -> AbstractContextManager[BatchDisplay | None]:
    """A live line on a terminal, a line per problem elsewhere, nothing when quiet."""
    if quiet:
        return nullcontext(None)
    console = Console(file=sys.stderr)
    if console.is_terminal and not console.is_dumb_terminal:
        return LiveBatchDisplay(console, progress)
    return LineBatchDisplay(sys.stderr, progress)


def plan_lines(plan: RunPlan, arm: str, run_dir: Path, problems: int, data: Path) -> list[str]:
    """What opening the run found, in a line or two for stderr."""
    lines = []
    if plan.set_aside is not None:
        lines.append(f"--force: the previous run in {run_dir} is kept as {plan.set_aside.name}")
    pool = f", trajectory pool of {plan.pool_size} per problem" if plan.pool_size else ""
    count = f"{problems} problems" + (f" × {plan.repeats} repeats (seed {plan.seed})" if plan.repeats > 1 else "")
    if plan.new_run:
        lines.append(f"new run in {run_dir}: {arm} on {count} from {data}{pool}")
    elif plan.new_arm:
        lines.append(f"adding arm {arm} to {run_dir} ({count}{pool})")
    else:
        failed = ""
        if plan.failed:
            failed = (
                f"{plan.failed} failed (retrying them; --no-retry-failed skips them), "
                if plan.retry_failed
                else f"{plan.failed} failed (skipped: --no-retry-failed), "
            )
        lines.append(f"resuming {arm} in {run_dir}: {plan.done} done (skipped), {failed}{plan.pending} unfinished")
    return lines


def summary_text(summary: report.ArmReport, run_dir: Path) -> str:
    accuracy = (
        f"accuracy {report.percent(summary.accuracy)} ({summary.correct}/{summary.graded})"
        if summary.graded
        else "no ground truth to grade"
        if summary.answered
        else "accuracy n/a"
    )
    failed = f", {summary.failed} failed" if summary.failed else ""
    pending = f", {summary.pending} unfinished" if summary.pending else ""
    repeats = f" ({summary.problems} problems × {summary.repeats} repeats)" if summary.repeats > 1 else ""
    if summary.repeated:
        accuracy = f"mean accuracy {report.percent(summary.accuracy)}{interval_text(summary)} over repeats"
    if summary.not_judged:
        accuracy += f" ({summary.not_judged} graded incorrect without being judged: see pacore report)"
    return (
        f"{summary.arm}: {summary.answered}/{summary.results} answered{repeats}{failed}{pending}, "
        f"{accuracy} -> {run_dir}"
    )
