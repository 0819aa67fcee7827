"""``pacore data``: get, check and generate data sets."""

from __future__ import annotations

import contextlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from pacore.cli.app import app
from pacore.cli.options import out_option
from pacore.errors import UsageError
from pacore.eval.synthetic import OPERATIONS

data_app = typer.Typer(help="Get, check and generate data sets.", no_args_is_help=True)
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
    from pacore.eval.datasets import dataset_fingerprint, load_dataset

    problems = load_dataset(path)
    summary: dict[str, Any] = {
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
        raise UsageError(f"--digits must look like 11-13 or 12, got {text[:30]!r}") from None
    return bounds


@data_app.command("synth", epilog=SYNTH_EXAMPLES)
def synth(
    out: Annotated[Path, out_option("FILE", "JSONL file to write.")],
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
    from pacore.eval.synthetic import synthetic_problems, write_jsonl

    operations = [op.strip() for op in ops.split(",") if op.strip()]
    problems = synthetic_problems(count, digits=_digit_range(digits), operations=operations, seed=seed)
    written = write_jsonl(problems, out)
    typer.echo(f"wrote {written} problems to {out}")


GET_EXAMPLES = """\
[bold]Examples[/bold]

  pacore data list
  pacore data get gsm8k                      # writes gsm8k.jsonl here
  pacore data get math500 --out data/math500.jsonl
  pacore data get gpqa-diamond --from gpqa_diamond.csv
  pacore data get gsm8k --from https://mirror.example/test.jsonl --sha256 HEX
"""


@data_app.command("get", epilog=GET_EXAMPLES)
def get(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A data set from 'pacore data list'.")],
    source: Annotated[
        str | None,
        typer.Option("--from", metavar="FILE_OR_URL", help="Read this file or URL instead of the public source."),
    ] = None,
    out: Annotated[Path | None, out_option("FILE", "JSONL file to write \\[default: NAME.jsonl].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out and download again even if cached.")] = False,
    sha256: Annotated[
        str | None, typer.Option("--sha256", metavar="HEX", help="The source file must have this sha256.")
    ] = None,
    max_mb: Annotated[
        float | None,
        typer.Option("--max-mb", metavar="MB", help="Refuse downloads larger than this \\[default: per data set]."),
    ] = None,
) -> None:
    """Download a data set, verify it and convert it to pacore JSONL."""
    from pacore.eval.catalogue import get_dataset
    from pacore.eval.download import format_size

    if max_mb is not None and not max_mb > 0:
        raise UsageError(f"--max-mb must be more than 0, got {max_mb}")
    target = out if out is not None else Path(f"{name.strip().lower()}.jsonl")
    report = get_dataset(
        name,
        out=target,
        source=source,
        force=force,
        sha256=sha256,
        max_bytes=None if max_mb is None else int(max_mb * 1_000_000),
        progress=download_bar if sys.stderr.isatty() else None,
    )
    for item in report.sources:
        how = "downloaded" if item.downloaded else "read" if item.trust == "local" else "cached"
        typer.echo(
            f"{how} {item.location} ({format_size(item.size)}, {item.rows} rows, "
            f"sha256 {item.sha256[:16]}, {item.trust})",
            err=True,
        )
    if report.unchanged:
        typer.echo(f"{report.out} already holds these {report.problems} problems")
    else:
        typer.echo(f"wrote {report.problems} problems to {report.out}")


@contextlib.contextmanager
def download_bar(label: str, total: int | None, done: int) -> Iterator[Callable[[int], None]]:
    """Rich's download bar on stderr for one file (a :data:`pacore.eval.download.DownloadBar`)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total, completed=done)
        yield lambda n: bar.advance(task, n)


@data_app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the catalogue as JSON.")] = False,
) -> None:
    """The data sets 'pacore data get' knows: name, description, source, problems, licence."""
    from pacore.eval.catalogue import CATALOGUE

    rows: list[dict[str, Any]] = [
        {
            "name": entry.name,
            "description": entry.description,
            "source": entry.page,
            "files": [f.url for f in entry.files],
            "problems": entry.problems,
            "kinds": list(entry.kinds),
            "licence": entry.licence,
            "verified": entry.verified,
            "note": entry.note,
        }
        for entry in CATALOGUE.values()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        source = row["source"].removeprefix("https://")
        problems = "?" if row["problems"] is None else row["problems"]  # not published
        typer.echo(f"{row['name']:<{width}}  {problems:>5} problems  {row['licence']}  {source}")
        typer.echo(f"{'':<{width}}  {row['description']}")
    typer.echo("Details (files, what was verified, notes): pacore data list --json")
