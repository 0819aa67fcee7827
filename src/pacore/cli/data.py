"""``pacore data``: check data set files and generate synthetic problems."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from pacore.cli.main import app
from pacore.errors import UsageError
from pacore.eval.datasets import dataset_fingerprint, load_dataset
from pacore.eval.synthetic import OPERATIONS, synthetic_problems, write_jsonl

data_app = typer.Typer(
    help="Check data set files and generate synthetic problems.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

SYNTH_EXAMPLES = """\
[bold]Examples[/bold]

  pacore data synth --count 200 --out synth.jsonl
  pacore data synth --count 50 --digits 11-13 --ops add,mul --seed 7 --out mul.jsonl
"""


@data_app.command("check")
def check(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="A .jsonl or .json data set.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Read a data set as 'pacore run' would and summarize it (count, answers, kinds, fingerprint)."""
    problems = load_dataset(path)
    summary = {
        "problems": len(problems),
        "with_answer": sum(1 for p in problems if p.answer is not None),
        "kinds": dict(Counter(p.kind for p in problems)),
        "fingerprint": dataset_fingerprint(problems),
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    kinds = ", ".join(f"{kind} {count}" for kind, count in summary["kinds"].items())
    typer.echo(
        f"{path}: {summary['problems']} problems, {summary['with_answer']} with an answer "
        f"(kinds: {kinds}); fingerprint {summary['fingerprint'][:16]}"
    )


def _digit_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise UsageError(f"--digits must look like 11-13 or 12, got {text!r}") from None
    return bounds


@data_app.command("synth", epilog=SYNTH_EXAMPLES)
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="JSONL file to write.")],
    count: Annotated[int, typer.Option("--count", "-n", metavar="N", help="How many problems.")] = 100,
    digits: Annotated[
        str, typer.Option("--digits", metavar="LOW-HIGH", help="Operand length in digits, e.g. 11-13.")
    ] = "11-13",
    ops: Annotated[
        str,
        typer.Option("--ops", metavar="LIST", help=f"Operations, comma-separated: {','.join(OPERATIONS)}."),
    ] = ",".join(OPERATIONS),
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same problems.")] = 0,
) -> None:
    """Write large-integer arithmetic problems with exact answers (plain JSONL format)."""
    operations = [op.strip() for op in ops.split(",") if op.strip()]
    problems = synthetic_problems(count, digits=_digit_range(digits), operations=operations, seed=seed)
    written = write_jsonl(problems, out)
    typer.echo(f"wrote {written} problems to {out}")
