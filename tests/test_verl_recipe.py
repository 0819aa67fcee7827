"""recipes/verl: the config against verl's own key set, the parquet against what verl reads, the reward as verl calls it.

verl itself does not install beside this project (it pins transformers below
the version TRL needs, and wants Ray and a GPU), so the checks are against
verl 0.9.1's documented config (every key path of its generated PPO config,
in tests/data) and against the reads of its data loader and naive reward
manager (``verl/utils/dataset/rl_dataset.py``,
``verl/experimental/reward_loop/reward_manager/naive.py``).
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fakes import Call, ScriptedBackend
from pacore.eval.datasets import Problem
from pacore.eval.export import export_train
from pacore.eval.runner import Arm, run_dataset
from pacore.rewards import compute_score

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "verl"
VERL_KEYS = Path(__file__).parent / "data" / "verl_0.9.1_ppo_trainer_keys.txt"


def key_paths(node: object, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    paths = []
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        paths.append(path)
        paths.extend(key_paths(value, path))
    return paths


def test_the_config_sets_only_keys_verl_knows_with_the_reports_values() -> None:
    config = yaml.safe_load((RECIPE / "config" / "pacore_synthesis.yaml").read_text())
    assert config["defaults"] == ["ppo_trainer", "_self_"]
    assert config["hydra"]["searchpath"] == ["pkg://verl.trainer.config"]
    known = {line for line in VERL_KEYS.read_text().splitlines() if line and not line.startswith("#")}
    assert len(known) > 900
    ours = [p for p in key_paths({k: v for k, v in config.items() if k not in ("hydra", "defaults")})]
    assert [p for p in ours if p not in known] == []
    # The report's setup: PPO (GAE with a critic), lambda = gamma = 1, 16 problems x 64 responses, 131k tokens.
    assert config["algorithm"] == {"adv_estimator": "gae", "gamma": 1.0, "lam": 1.0, "use_kl_in_reward": False}
    assert config["data"]["train_batch_size"] == 16
    assert config["actor_rollout_ref"]["rollout"]["n"] == 64
    assert config["data"]["max_prompt_length"] + config["data"]["max_response_length"] == 131072
    assert config["reward"]["custom_reward_function"]["name"] == "compute_score"
    assert config["trainer"]["total_training_steps"] == 250


def test_the_launch_script_sets_verl_keys_and_refuses_a_bad_stage(tmp_path: Path) -> None:
    script = (RECIPE / "run_pacore_synthesis.sh").read_text()
    known = set(VERL_KEYS.read_text().splitlines())
    overrides = [
        line.strip().split("=")[0]
        for line in script.splitlines()
        if line.strip().startswith(("actor_", "critic.", "data.", "reward.", "trainer."))
    ]
    assert len(overrides) >= 7 and [o for o in overrides if o not in known] == []
    bad = subprocess.run(["bash", str(RECIPE / "run_pacore_synthesis.sh"), "stage3"], capture_output=True, text=True,
                         env={"MODEL": "/m", "PATH": "/usr/bin:/bin:" + str(Path(__import__("sys").executable).parent)})  # fmt: skip
    assert bad.returncode == 2 and "unknown stage 'stage3'" in bad.stderr


def reply(call: Call, i: int) -> str:
    n = int(call.last_user_text.split("Problem ")[1].split(":")[0])
    return f"Sample {i}: the answer is {n + 1 if i % 2 else 0}"


@pytest.fixture
def verl_parquet(tmp_path: Path) -> Path:
    problems = [
        Problem(id=f"q{n}", messages=[{"role": "user", "content": f"Problem {n}: what is {n} plus one?"}], answer=str(n + 1), kind="number")
        for n in range(3)
    ]  # fmt: skip
    asyncio.run(
        run_dataset(
            tmp_path / "run",
            problems,
            dataset_path="sums.jsonl",
            arm=Arm.build("majority", samples=1),
            backend=ScriptedBackend(respond=reply, max_n=4),
            pool_size=4,
        )  # fmt: skip
    )
    export_train(tmp_path / "run", tmp_path / "stage1.parquet", format="verl", min_size=4, max_size=4, max_acc=0.9)
    return tmp_path / "stage1.parquet"


def test_the_parquet_has_the_shape_verls_loader_reads(verl_parquet: Path) -> None:
    schema = pq.read_schema(verl_parquet)
    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    assert schema.field("prompt").type in (
        pa.list_(message),
        pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
    )
    assert schema.field("data_source").type == pa.string()
    assert schema.field("ability").type == pa.string()
    reward_model = schema.field("reward_model").type
    assert {reward_model.field(i).name for i in range(reward_model.num_fields)} == {"style", "ground_truth"}
    extra = schema.field("extra_info").type
    names = {extra.field(i).name for i in range(extra.num_fields)}
    assert {"id", "index", "kind", "problem", "message_accuracy", "message_indices"} <= names
    # RLHFDataset: rows through pandas, prompt under data.prompt_key, chat messages with string content.
    frame = pq.read_table(verl_parquet).to_pandas()
    assert len(frame) == 3
    for _, row in frame.iterrows():
        messages = list(row["prompt"])
        assert messages[-1]["role"] == "user" and isinstance(messages[-1]["content"], str)
        assert "Reference 4:" in messages[-1]["content"]


def test_the_reward_as_verls_naive_reward_manager_calls_it(verl_parquet: Path) -> None:
    rows = pq.read_table(verl_parquet).to_pylist()
    scores = []
    for row in rows:
        # What naive.py does per sample: read the columns, add its own extra_info keys, call with keywords.
        data_source = row["data_source"]
        ground_truth = row["reward_model"]["ground_truth"]
        extra_info = dict(row["extra_info"])
        extra_info["num_turns"] = None
        extra_info["rollout_reward_scores"] = {}
        for response in (f"... so the answer is {ground_truth}", "... so the answer is 12345"):
            scores.append(
                compute_score(
                    data_source=data_source, solution_str=response, ground_truth=ground_truth, extra_info=extra_info
                )
            )
    assert scores == [1.0, 0.0] * 3
    assert all(isinstance(score, float) for score in scores)
