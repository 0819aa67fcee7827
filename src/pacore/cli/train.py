"""``pacore train``: GRPO on a ``trl`` export with pacore's rewards (needs ``pacore[train]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pacore.cli.app import app

TRAIN_EXAMPLES = """\
[bold]Example config[/bold] (TOML; paths are relative to the file)

  model = "models/SmolLM2.gguf"   # a .gguf or a Hugging Face model directory
  data = "train.parquet"          # pacore export-train --format trl
  output_dir = "checkpoints/synthesis"
  steps = 200
  generations = 8            # completions per prompt
  prompts_per_step = 2
  max_prompt_length = 4096   # longer prompts are dropped, never cut
  max_completion_length = 1024
  learning_rate = 1e-6
  reward = "outcome"         # or "process", with verifier = URL

Run the same command again to resume from the last checkpoint in output_dir.
"""


@app.command("train", epilog=TRAIN_EXAMPLES)
def train_command(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="TOML file with the training settings.")],
    steps: Annotated[int | None, typer.Option("--steps", help="Override the config's steps.")] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", metavar="DIR", help="Override the config's output_dir.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint in the output directory.")
    ] = True,
) -> None:
    """GRPO-train a model on synthesis prompts with pacore's rewards, through TRL.

    Writes log.jsonl, rewards.jsonl, checkpoint-N/, final/ and reward_curve.png in the output directory.
    """
    from pacore.training import load_config, train

    settings = load_config(config, steps=steps, output_dir=str(output_dir.resolve()) if output_dir else None)
    summary = train(settings, resume=resume)
    reward = f"{summary.last_reward:.3f}" if summary.last_reward is not None else "n/a"
    typer.echo(
        f"train: {summary.steps} steps, last mean reward {reward} -> {summary.final_model} (curve: {summary.plot})"
    )
