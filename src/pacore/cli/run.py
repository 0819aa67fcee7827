"""``pacore run``: evaluate a data set under a method, and ``pacore regrade``: grade its stored
answers again (``pacore report`` and ``pacore export-train`` read its results, in :mod:`pacore.cli.report`)."""

from __future__ import annotations

import asyncio
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Annotated, TextIO, cast

import typer
from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from pacore.adaptive import ComputePolicy
from pacore.cli.app import app
from pacore.cli.options import (
    ScheduleOption,
    SolveFlags,
    out_option,
    panel_option,
    with_solve_options,
)
from pacore.cli.results import interval_text, results_unit
from pacore.errors import PacoreError
from pacore.eval import report
from pacore.eval.datasets import Problem, load_dataset
from pacore.eval.regrade import regrade_run
from pacore.eval.runner import DEFAULT_SAMPLES, METHODS, Arm, BatchProgress, BatchRun, RunPlan
from pacore.progress import format_duration
from pacore.prompts import SynthesisTemplate
from pacore.store import ProblemResult

_run_option = panel_option("Run")
_data_option = panel_option("Data set")

RUN_EXAMPLES = """\
[bold]Examples[/bold]

  pacore run gsm8k.jsonl --out runs/gsm8k --limit 20 --method pacore --schedule 2 --max-tokens 256
  pacore run gsm8k.jsonl --out runs/gsm8k --limit 20 --method majority --samples 3 --add-arm ...
  pacore run aime.jsonl --out runs/aime --pool-size 32 --schedule low -b http://127.0.0.1:8000/v1
  pacore run aime.jsonl --out runs/aime --schedule high            # same pool, another arm
  pacore run aime.jsonl --out runs/aime --method majority --samples 32
  pacore run aime.jsonl --out runs/aime --schedule low --repeats 16   # 16 draws per problem
  pacore run aime.jsonl --out runs/aime --schedule low --repeats 16 --seed 7  # 16 more
  pacore run aime.jsonl --out runs/aime --schedule 32 --adaptive-k --wave 8   # a policy arm, on the pool

Run the same command again to resume: done problems are skipped, unfinished ones
redone, failed ones retried.

[bold]Exit codes[/bold]: 0 every problem answered; 1 some problems failed (rerun to retry) or
a runtime failure; 2 bad usage (bad data file, run directory of another data set or
settings...); 130 interrupted (every finished problem is kept; rerun to resume).
"""


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


@app.command("run", epilog=RUN_EXAMPLES)
@with_solve_options
def run(
    data: Annotated[Path, typer.Argument(metavar="DATA", help="Data set file (JSONL or a JSON list).")],
    out: Annotated[Path, out_option("RUN_DIR", "Run directory (created if needed).")],
    method: Annotated[str, _run_option("--method", help=f"One of {', '.join(METHODS)}.")] = "pacore",
    schedule: ScheduleOption = None,  # type: ignore[assignment]  # None: the pacore default (low)
    samples: Annotated[
        int | None,
        _run_option(
            "--samples", metavar="K", help=f"Samples voted over by --method majority \\[default: {DEFAULT_SAMPLES}]."
        ),
    ] = None,
    pool_size: Annotated[
        int | None,
        _run_option(
            "--pool-size",
            metavar="P",
            help="Generate P first-round trajectories per problem once and draw every arm's "
            "first round (K1 <= P, k <= P) from them.",
        ),
    ] = None,
    concurrency: Annotated[int, _run_option("--concurrency", "-j", metavar="N", help="Problems solved at once.")] = 4,
    add_arm: Annotated[
        bool, _run_option("--add-arm", help="Evaluate another method in a run directory without a pool.")
    ] = False,
    force: Annotated[
        bool, _run_option("--force", help="If RUN_DIR holds another data set or settings, set it aside and start over.")
    ] = False,
    repeats: Annotated[
        int,
        _run_option(
            "--repeats",
            metavar="R",
            help="Run each problem R times (independent draws from the pool, else fresh samples) and "
            "report the mean accuracy over repeats. Another --seed on a pooled run adds R more.",
        ),
    ] = 1,
    retry_failed: Annotated[
        bool, _run_option("--retry-failed/--no-retry-failed", help="When resuming, retry problems that failed.")
    ] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    limit: Annotated[int | None, _data_option("--limit", metavar="N", help="Use at most N problems.")] = None,
    offset: Annotated[int, _data_option("--offset", metavar="N", help="Skip the first N problems.")] = 0,
    shuffle: Annotated[
        bool,
        _data_option("--shuffle", help="Shuffle the problems (with --seed, default 0) before --offset and --limit."),
    ] = False,
    *,
    flags: SolveFlags,
    compute: ComputePolicy | None = None,
) -> None:
    """Evaluate a data set under a method; resumable, every finished problem committed.

    Results go to RUN_DIR/run.sqlite; see them with 'pacore report RUN_DIR'.
    """
    arm = Arm.build(method, schedule=schedule, samples=samples, compute=compute)
    options = flags.solve_options(arm.schedule)
    synthesis = cast(SynthesisTemplate, options.template)  # loaded (and trial-rendered) by solve_options
    problems = load_dataset(data, limit=limit, offset=offset, shuffle=shuffle, seed=flags.seed or 0)
    opened = flags.open_backend()

    async def execute(batch: BatchRun, display: BatchDisplay | None) -> report.ArmReport:
        try:
            return await batch.execute(display.problem_finished if display else None)
        finally:
            await opened.aclose()

    with BatchRun.open(
        out, problems, dataset_path=data, arm=arm, backend=opened, params=options.params,
        template=synthesis, pool_size=pool_size, concurrency=concurrency, retry_failed=retry_failed,
        add_arm=add_arm, force=force, deadline=options.deadline, min_success=options.min_success,
        repeats=repeats, reference_order=options.reference_order,
    ) as batch:  # fmt: skip
        if not quiet:
            for line in plan_lines(batch.plan, arm.name, out, len(problems), data):
                typer.echo(line, err=True)
        with open_batch_display(batch.progress, quiet) as display:
            summary = asyncio.run(execute(batch, display))
    typer.echo(summary_text(summary, out))
    if summary.failed:
        reason, count = summary.failure_reasons[0]
        raise PacoreError(
            f"{summary.failed} of {summary.results} {results_unit(summary.repeats)} failed ({count} x {reason}); "
            "rerun the same command to retry them"
        )


REGRADE_EXAMPLES = """\
[bold]Examples[/bold]

  pacore regrade runs/aime
  pacore regrade runs/aime --arm majority-32 --arm pacore-low

Nothing is generated: each done result is graded again from its stored answer, and only what changed is written back (safe while 'pacore run' works on the same directory; a second regrade changes nothing). Then 'pacore report RUN_DIR' shows the new accuracies.
"""


@app.command("regrade", epilog=REGRADE_EXAMPLES)
def regrade(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Run directory to re-grade.")],
    arms: Annotated[
        list[str] | None,
        typer.Option("--arm", metavar="NAME", help="Re-grade only this arm (repeatable) \\[default: every arm]."),
    ] = None,
) -> None:
    """Grade a run's stored answers again with the current grader.

    Every done result with a ground truth gets its extracted answer, grade and grade note
    recomputed as 'pacore run' would now; one line per arm says how many results were
    checked and what changed.
    """
    for counts in regrade_run(run_dir, arms or ()):
        typer.echo(counts.line())
