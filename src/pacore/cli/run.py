"""``pacore run``: evaluate a data set under a method, and ``pacore regrade``: grade its stored
answers again (``pacore report`` and ``pacore export-train`` read its results, in :mod:`pacore.cli.report`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from pacore.adaptive import ComputePolicy
from pacore.cli.app import app
from pacore.cli.options import (
    ScheduleOption,
    SolveFlags,
    out_option,
    panel_option,
    with_solve_options,
)
from pacore.cli.results import results_unit
from pacore.errors import PacoreError
from pacore.eval.choices import DEFAULT_SAMPLES, METHODS

if TYPE_CHECKING:
    from pacore.cli.run_display import BatchDisplay
    from pacore.eval import report
    from pacore.eval.runner import BatchRun
    from pacore.prompts import SynthesisTemplate

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
    # The evaluation code is imported here: declaring the command (every `pacore --help`) needs none of it.
    import asyncio

    from pacore.cli.run_display import open_batch_display, plan_lines, summary_text
    from pacore.eval.datasets import load_dataset
    from pacore.eval.runner import Arm, BatchRun

    arm = Arm.build(method, schedule=schedule, samples=samples, compute=compute)
    options = flags.solve_options(arm.schedule)
    synthesis = cast("SynthesisTemplate", options.template)  # loaded (and trial-rendered) by solve_options
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
    from pacore.eval.regrade import regrade_run

    for counts in regrade_run(run_dir, arms or ()):
        typer.echo(counts.line())
