"""``pacore report`` and ``pacore export-train``: read what ``pacore run`` stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from pacore.cli.app import app
from pacore.cli.options import TemplateOption, out_option, panel_option, parse_reference_order
from pacore.cli.results import interval_text
from pacore.eval import choices


@app.command("report")
def report_command(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR...", help="Run directories to report on.")],
    out: Annotated[Path | None, out_option("DIR", "Where to write the report \\[default: the first RUN_DIR].")] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the figures as one JSON object on stdout.")
    ] = False,
    verifier: Annotated[
        str | None,
        typer.Option(
            "--verifier",
            metavar="SPEC",
            help="Judge the derivation of every correct answer with this model (a backend spec: "
            "http://host:port/v1, gguf:/path, embedded) and report each arm's spurious correctness.",
        ),
    ] = None,
    verifier_template: Annotated[
        Path | None,
        typer.Option("--verifier-template", metavar="FILE", help="Jinja2 verifier prompt instead of the built-in one."),
    ] = None,
    verifier_model: Annotated[
        str | None, typer.Option("--verifier-model", help="Model name sent to the verifier's server.")
    ] = None,
) -> None:
    """Write report.md, report.html, accuracy_vs_ttc.png and report.csv for one or more runs.

    The report opens with each run's model, backend, settings, data set, dates and
    pacore version, and ends with a table of every problem's result (also in report.csv).

    Per arm: accuracy with a 95% interval (Wilson with one result per problem; with
    --repeats, the mean over problems of per-problem accuracy with a normal
    approximation over problems), mean effective TTC and prompt tokens, wall time,
    failures; for PaCoRe arms, synthesis diagnostics; with --verifier, spurious correctness
    (verdicts cached, see docs/train.md).
    """
    from pacore.eval import report
    from pacore.verifier import Verifier

    if verifier is None:
        arms, files = report.write_report(run_dirs, out)
    else:
        options: dict[str, Any] = {"model": verifier_model} if verifier_model else {}
        with Verifier(verifier, template=verifier_template, **options) as judge:
            arms, files = report.write_report(run_dirs, out, verifier=judge)
    if json_output:
        document = {
            "runs": [str(d) for d in run_dirs],
            "files": {
                "markdown": str(files.markdown),
                "html": str(files.html),
                "plot": str(files.plot),
                "csv": str(files.csv),
            },
            "methods": [arm.as_dict() for arm in arms],
        }
        typer.echo(json.dumps(document, indent=2))
        return
    for arm in arms:
        prefix = f"{arm.run} " if len(run_dirs) > 1 else ""
        tokens = f"{arm.mean_completion_tokens:,.0f}" if arm.mean_completion_tokens is not None else "n/a"
        graded = (
            f"{arm.graded} graded results of {len(arm.problem_accuracies)} problems (mean over repeats)"
            if arm.repeated
            else f"{arm.graded} graded"
        )
        spurious = (
            f", spurious correctness {report.percent(arm.spurious.rate)} of {arm.spurious.judged} judged"
            if arm.spurious
            else ""
        )
        typer.echo(
            f"{prefix}{arm.arm}: accuracy {report.percent(arm.accuracy)}{interval_text(arm)} on {graded}, "
            f"{tokens} TTC tokens/problem, {arm.failed} failed"
            + (f", {arm.pending} unfinished" if arm.pending else "")
            + (f", {arm.not_judged} graded incorrect without being judged" if arm.not_judged else "")
            + spurious
        )
    typer.echo(f"wrote {files.markdown}, {files.html}, {files.plot} and {files.csv}")


EXPORT_EXAMPLES = """\
[bold]Examples[/bold]

  pacore export-train runs/aime --out train.jsonl
  pacore export-train runs/aime --format verl --out stage1.parquet
  pacore export-train PaCoRe-Train-8k.jsonl --format trl --out train.parquet
  pacore export-train runs/aime --format verl --out stage2.parquet \\
      --synthesis-acc 0..1 --synthesis-run runs/stage1-policy

Stage 1 filters on message accuracy (--min-acc/--max-acc), stage 2 on the synthesis success of the stage-1 policy (--synthesis-acc). Without --template/--reference-order the prompts use the run's template and reference order. See docs/train.md.
"""


_stage_one_option = panel_option("Stage 1: message sets")
_stage_two_option = panel_option("Stage 2: synthesis success")


@app.command("export-train", epilog=EXPORT_EXAMPLES)
def export_train_command(
    source: Annotated[
        Path,
        typer.Argument(metavar="SOURCE", help="A run directory, or a data file in the PaCoRe-Train layout."),
    ],
    out: Annotated[Path, out_option("FILE", "File to write (.jsonl or .parquet).")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help=f"One of {', '.join(choices.FORMATS)}: the released JSONL layout, verl's "
            "parquet, or a TRL data set; verl and trl hold the synthesis prompt the engine sends.",
        ),
    ] = "pacore",
    min_acc: Annotated[
        float, _stage_one_option("--min-acc", help="Keep problems whose message-set accuracy is above this.")
    ] = choices.DEFAULT_MIN_ACC,
    max_acc: Annotated[
        float, _stage_one_option("--max-acc", help="... and below this (9/24 in the report).")
    ] = choices.DEFAULT_MAX_ACC,
    min_size: Annotated[int, _stage_one_option("--min-size", help="Smallest message set (clipped to what exists).")] = (
        choices.DEFAULT_MIN_SIZE
    ),
    max_size: Annotated[int, _stage_one_option("--max-size", help="Largest message set.")] = choices.DEFAULT_MAX_SIZE,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the message-set draws and of the reference order.")] = 0,
    arm: Annotated[
        str | None,
        typer.Option(
            "--arm",
            help="Take the responses from this arm's first round \\[default: the pool, else the "
            "arm with the widest first round].",
        ),
    ] = None,
    synthesis_acc: Annotated[
        str | None,
        _stage_two_option(
            "--synthesis-acc",
            metavar="MIN..MAX",
            help="Keep problems whose synthesis success rate in --synthesis-run lies strictly "
            "between MIN and MAX (0..1: sometimes but not always right).",
        ),
    ] = None,
    synthesis_run: Annotated[
        Path | None,
        _stage_two_option(
            "--synthesis-run",
            metavar="RUN_DIR",
            help="A pacore run of the stage-1 policy on these problems (with repeats) \\[default: SOURCE].",
        ),
    ] = None,
    template: TemplateOption = None,
    order: Annotated[
        str | None,
        typer.Option(
            "--reference-order",
            "--order",
            help="Reference order of the prompt: shuffle (seeded) or release \\[default: the run's, else shuffle].",
        ),
    ] = None,
) -> None:
    """Write RL training records for the synthesis step (PaCoRe-Train JSONL, verl parquet or TRL).

    In verl and trl records the prompt is the synthesis conversation the engine sends, built with
    the run's template and reference order unless --template / --reference-order say otherwise.
    """
    from pacore.eval import export

    if order is not None:
        parse_reference_order(order)
    summary = export.export_train(
        source, out, format=format, min_acc=min_acc, max_acc=max_acc, min_size=min_size,  # type: ignore[arg-type]
        max_size=max_size, seed=seed, arm=arm, template=template, order=order,  # type: ignore[arg-type]
        synthesis_acc=export.parse_range(synthesis_acc) if synthesis_acc is not None else None,
        synthesis_run=synthesis_run,
    )  # fmt: skip
    typer.echo(f"export-train: {summary.line()}")
