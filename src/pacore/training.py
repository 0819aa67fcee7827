"""``pacore train``: GRPO on a ``trl`` export with pacore's rewards, through TRL (one machine).

pacore writes no trainer of its own: this module turns a small TOML config
into TRL's ``GRPOTrainer`` with :mod:`pacore.rewards` as the reward, and adds
what a user needs around it:

- models from a local path: a Hugging Face model directory, or a GGUF file
  (or a directory holding one), which transformers dequantizes; a model
  loaded from GGUF is rebuilt from its config and state dict so that it can
  be trained and saved;
- prompts longer than ``max_prompt_length`` tokens are dropped, never cut
  (a truncated synthesis prompt would teach the wrong task);
- ``OUTPUT_DIR/log.jsonl`` (TRL's figures at every step: loss, reward...),
  ``OUTPUT_DIR/rewards.jsonl`` (every completion the reward function scored,
  with its ground truth and reward), checkpoints in ``OUTPUT_DIR/checkpoint-N``
  (the run resumes from the last one), the trained model in
  ``OUTPUT_DIR/final`` and the reward curve in ``OUTPUT_DIR/reward_curve.png``.

Needs the ``train`` extra (torch, transformers, trl); nothing here is
imported by the rest of pacore.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pacore._extras import require
from pacore.backends.llama_cpp import cache_dir as models_cache_dir
from pacore.errors import UsageError
from pacore.eval.rewards import RewardName, make_reward_func

LOG_NAME = "log.jsonl"
REWARDS_LOG_NAME = "rewards.jsonl"
PLOT_NAME = "reward_curve.png"
FINAL_NAME = "final"
CONFIG_COPY_NAME = "train_config.json"
#: Bumped when the GGUF conversion changes, so older conversions in the cache are not reused.
_CONVERSION_VERSION = 2

#: What GRPO training imports (the ``train`` extra).
TRAIN_MODULES = ("torch", "transformers", "trl", "datasets")


class TrainConfig(BaseModel):
    """The knobs of a GRPO run; paths in a config file are relative to that file.

    Each bound is checked when the config is made: a TOML value of another type
    (``steps = "ten"``), a bound not met or an unknown key is refused.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    #: A Hugging Face model directory, a ``.gguf`` file, or a directory holding one GGUF file.
    model: str
    #: A ``trl`` export (``pacore export-train --format trl``): parquet or JSONL.
    data: str
    output_dir: str
    steps: int = Field(default=100, ge=1)
    #: Completions sampled per prompt (GRPO's group size): GRPO compares completions of one prompt.
    generations: int = Field(default=8, ge=2)
    prompts_per_step: int = Field(default=1, ge=1)
    max_prompt_length: int = Field(default=4096, ge=1)
    max_completion_length: int = Field(default=1024, ge=1)
    learning_rate: float = Field(default=1e-6, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    #: KL coefficient against the reference model (0: no reference model is kept).
    beta: float = Field(default=0.0, ge=0)
    save_steps: int = Field(default=50, ge=1)
    #: Checkpoints kept (older ones are deleted); each holds the model and optimizer state.
    keep_checkpoints: int = Field(default=2, ge=1)
    #: numpy, which TRL seeds too, takes 0 to 2**32 - 1.
    seed: int = Field(default=0, ge=0, lt=2**32)
    #: ``outcome`` (the report's) or ``process`` (needs ``verifier``).
    reward: RewardName = "outcome"
    verifier: str | None = None
    verifier_model: str | None = None
    verifier_template: str | None = None
    #: CPU threads for torch; 1 is much faster for small models on a few cores.
    threads: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _process_reward_has_a_verifier(self) -> Self:
        if self.reward == "process" and not self.verifier:
            raise ValueError("reward = 'process' needs a verifier (a backend spec)")
        return self


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a TOML config (keys as in :class:`TrainConfig`, top level or under ``[train]``)."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read train config {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"train config {path}: {exc}") from None
    values = dict(document.get("train", document))
    values.update({key: value for key, value in overrides.items() if value is not None})
    known = TrainConfig.model_fields
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"train config {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    missing = [name for name in ("model", "data", "output_dir") if name not in values]
    if missing:
        raise UsageError(f"train config {path}: missing {', '.join(missing)}")
    for name in ("model", "data", "output_dir", "verifier_template"):
        if isinstance(values.get(name), str):
            values[name] = str(path.parent / values[name]) if not Path(values[name]).is_absolute() else values[name]
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise UsageError(f"train config {path}: {_config_problem(exc)}") from None


def _config_problem(exc: ValidationError) -> str:
    """The first problem of a config, in a line: the key, what it must be, and what it was."""
    error = exc.errors(include_url=False)[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a rule across keys says them itself
        return message
    return f"{error['loc'][0]}: {message[:1].lower()}{message[1:]}, got {error['input']!r}"


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the only ``.gguf`` in a directory without ``config.json``."""
    if path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise UsageError(f"{path} holds several GGUF files ({', '.join(f.name for f in found)}); name one")
        return found[0] if found else None
    return None


def existing_model_path(path: str | Path) -> Path:
    """``path`` if it exists, else a one-line usage error."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"model path {path} does not exist")
    return path


def existing_data_path(path: str | Path) -> Path:
    """``path`` if it is a file, else a one-line usage error that says how to write one."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"training data {path} does not exist (write it with 'pacore export-train --format trl')")
    return path


def load_model(path: str | Path, progress: TextIO | None = None) -> tuple[Any, Any]:
    """A trainable float32 causal LM and its tokenizer from a local directory or GGUF file.

    A GGUF is dequantized once and the result kept as a Hugging Face model
    directory in the cache (see :func:`converted_gguf_dir`): converting
    takes minutes on a small CPU, loading the conversion seconds.
    """
    path = existing_model_path(path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(path)
    if gguf is not None:
        path = converted_gguf_dir(gguf, progress)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise UsageError(f"the tokenizer of {path} has no chat template; the synthesis prompts are chat messages")
    return model, tokenizer


def converted_gguf_dir(gguf: Path, progress: TextIO | None = None) -> Path:
    """A Hugging Face model directory holding ``gguf`` dequantized to float32 (made once, then reused).

    The conversion is found by the file's name and content hash, not its
    modification time, which every reinstall of a package that ships the
    file changes. One conversion per file name is kept: a new one replaces
    those of earlier contents (each is four times the size of a 4-bit GGUF).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with gguf.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    conversions = models_cache_dir() / "gguf-hf"
    target = conversions / f"{gguf.stem}-{digest[:16]}-v{_CONVERSION_VERSION}"
    if (target / "config.json").is_file():
        return target
    if progress is not None:
        print(f"dequantizing {gguf.name} once (kept in {target.parent})...", file=progress, flush=True)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model dequantized from GGUF still counts as quantized (transformers refuses to train it)
    # and keeps GGUF bookkeeping that breaks saving: rebuild a plain one from its config and weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    eos = config.eos_token_id
    if isinstance(eos, int) and tokenizer.eos_token_id != eos:
        # The GGUF tokenizer conversion can take another special token for EOS (SmolLM2: <|im_start|>);
        # the model's config says which token ends a turn, and generation must stop there.
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)  # whole or not at all: another process may be converting too
    remove_older_conversions(conversions, gguf.stem, keep=target)
    return target


def remove_older_conversions(conversions: Path, stem: str, keep: Path) -> None:
    """Delete the conversions of a GGUF file named ``stem`` other than ``keep``.

    Also those kept under the former key (size and modification time).
    """
    older = re.compile(rf"{re.escape(stem)}-(?:[0-9a-f]{{16}}|\d+-\d+)-v\d+")
    for path in conversions.iterdir():
        if path != keep and older.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)


def load_prompts(path: str | Path, tokenizer: Any, max_prompt_length: int) -> tuple[Any, int]:
    """The ``trl`` export as a ``datasets.Dataset``, without prompts longer than ``max_prompt_length`` tokens."""
    path = existing_data_path(path)
    from datasets import load_dataset

    kind = "json" if path.suffix in (".jsonl", ".json") else "parquet"
    dataset = load_dataset(kind, data_files=str(path), split="train")
    missing = [column for column in ("prompt", "ground_truth") if column not in dataset.column_names]
    if missing:
        raise UsageError(
            f"{path} has no {', '.join(missing)} column: export it with 'pacore export-train --format trl'"
        )

    def fits(row: dict[str, Any]) -> bool:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return len(ids) <= max_prompt_length

    kept = dataset.filter(fits)
    if len(kept) == 0:
        raise UsageError(f"no prompt of {path} fits in max_prompt_length = {max_prompt_length} tokens")
    return kept, len(dataset) - len(kept)


def logged_reward(reward: Callable[..., list[float | None]], path: Path) -> Callable[..., list[float | None]]:
    """``reward`` that also appends what it scored to ``path`` (one JSON line per call)."""

    def scored(prompts: Any = None, completions: Any = None, **kwargs: Any) -> list[float | None]:
        rewards = reward(prompts=prompts, completions=completions, **kwargs)
        state = kwargs.get("trainer_state")
        record = {
            "step": getattr(state, "global_step", None),
            "reward_function": reward.__name__,
            "completions": [_completion_text(c) for c in completions or []],
            "ground_truth": list(kwargs.get("ground_truth") or []),
            "kind": list(kwargs.get("kind") or []),
            "rewards": rewards,
        }
        with path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
        return rewards

    scored.__name__ = reward.__name__
    return scored


def _completion_text(completion: Any) -> str:
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer steps a checkpoint holds (from its ``trainer_state.json``)."""
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(checkpoint.name.split("-")[1])


def last_checkpoint(output_dir: Path) -> Path | None:
    numbered = [(int(p.name.split("-")[1]), p) for p in output_dir.glob("checkpoint-*")
                if p.name.split("-")[1].isdigit()]  # fmt: skip
    return max(numbered)[1] if numbered else None


@dataclass
class TrainSummary:
    output_dir: Path
    steps: int
    resumed_from: Path | None
    dropped_prompts: int
    final_model: Path
    plot: Path
    last_reward: float | None


def train(config: TrainConfig, *, resume: bool = True, progress: TextIO | None = sys.stderr) -> TrainSummary:
    """Run GRPO as ``config`` says; returns where everything went."""
    # A mistyped path is refused before torch is imported (seconds) and before anything is written.
    existing_model_path(config.model)
    existing_data_path(config.data)
    os.environ.setdefault("OMP_NUM_THREADS", str(config.threads))
    require("train", *TRAIN_MODULES, feature="pacore train")
    import torch
    from transformers import PrinterCallback, TrainerCallback
    from transformers.utils import logging as transformers_logging
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(config.threads)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_COPY_NAME).write_text(config.model_dump_json(indent=2) + "\n", encoding="utf-8")
    checkpoint = last_checkpoint(output_dir) if resume else None
    if checkpoint is None:  # a fresh run starts fresh logs
        for name in (LOG_NAME, REWARDS_LOG_NAME):
            (output_dir / name).unlink(missing_ok=True)
    elif checkpoint_step(checkpoint) >= config.steps and (output_dir / FINAL_NAME).is_dir():
        if progress is not None:
            done = checkpoint_step(checkpoint)
            print(f"already trained {done} steps ({checkpoint.name}); raise steps to go on", file=progress)
        return _summary(config, output_dir, checkpoint, dropped=0)

    model, tokenizer = load_model(config.model, progress)
    transformers_logging.disable_progress_bar()  # our own line per step says more
    dataset, dropped = load_prompts(config.data, tokenizer, config.max_prompt_length)
    reward = make_reward_func(
        config.reward,
        verifier=config.verifier, verifier_model=config.verifier_model, verifier_template=config.verifier_template,
    )  # fmt: skip
    args = GRPOConfig(
        output_dir=str(output_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.prompts_per_step * config.generations,
        gradient_accumulation_steps=1,
        num_generations=config.generations,
        max_completion_length=config.max_completion_length,
        learning_rate=config.learning_rate,
        temperature=config.temperature,
        beta=config.beta,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.keep_checkpoints,
        logging_steps=1,
        seed=config.seed,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        dataloader_num_workers=0,
    )

    class Progress(TrainerCallback):
        """One line per step on ``progress`` and in ``log.jsonl``."""

        started = time.monotonic()

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if not logs:
                return
            record = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            with (output_dir / LOG_NAME).open("a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
            if progress is not None and "reward" in logs:
                elapsed = time.monotonic() - self.started
                print(
                    f"step {state.global_step}/{config.steps} · loss {logs.get('loss', float('nan')):.4f} "
                    f"· reward {logs['reward']:.3f} · {elapsed:.0f}s",
                    file=progress, flush=True,
                )  # fmt: skip

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[logged_reward(reward, output_dir / REWARDS_LOG_NAME)],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Progress()],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict on stdout
    if progress is not None:
        origin = f", resuming from {checkpoint.name}" if checkpoint else ""
        skipped = f" ({dropped} longer than {config.max_prompt_length} tokens dropped)" if dropped else ""
        plan = f"GRPO on {len(dataset)} prompts{skipped}, {config.steps} steps, reward {config.reward}{origin}"
        print(plan, file=progress, flush=True)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    trainer.save_model(str(output_dir / FINAL_NAME))
    tokenizer.save_pretrained(str(output_dir / FINAL_NAME))
    return _summary(config, output_dir, checkpoint, dropped)


def _summary(config: TrainConfig, output_dir: Path, resumed_from: Path | None, dropped: int) -> TrainSummary:
    """Plot the curve of everything logged so far and say where things are."""
    history = read_log(output_dir / LOG_NAME)
    plot_rewards(history, output_dir / PLOT_NAME)
    rewards = [r["reward"] for r in history if "reward" in r]
    last = rewards[-1] if rewards else None
    return TrainSummary(
        output_dir, config.steps, resumed_from, dropped, output_dir / FINAL_NAME, output_dir / PLOT_NAME, last
    )


def read_log(path: Path) -> list[dict[str, Any]]:
    """The per-step records of ``log.jsonl``, the last one of each step (a resumed run repeats some)."""
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


def plot_rewards(history: list[dict[str, Any]], path: Path) -> None:
    """Mean reward (with its spread across completions) and loss against the step."""
    require("train", "matplotlib", feature="the training reward plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in history if "reward" in r]
    rewards = [r["reward"] for r in history if "reward" in r]
    spread = [r.get("reward_std", 0.0) for r in history if "reward" in r]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), dpi=120, sharex=True)
    try:
        top.plot(steps, rewards, marker="o", label="mean reward")
        top.fill_between(steps, [r - s for r, s in zip(rewards, spread, strict=True)],
                         [r + s for r, s in zip(rewards, spread, strict=True)], alpha=0.2, label="± std")  # fmt: skip
        top.set_ylabel("reward")
        top.set_title("GRPO reward curve")
        top.grid(True, alpha=0.3)
        top.legend()
        losses = [(r["step"], r["loss"]) for r in history if "loss" in r]
        bottom.plot([s for s, _ in losses], [v for _, v in losses], marker=".", color="tab:red")
        bottom.set_ylabel("loss")
        bottom.set_xlabel("step")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        bottom.grid(True, alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
