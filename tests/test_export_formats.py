"""``pacore export-train --format verl|trl``: the prompt is what the engine sends, byte for byte.

Also: the PaCoRe-Train file as input, the stage-2 synthesis-success filter,
images, and the CLI's refusals.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cli_harness import pacore_in_process
from fakes import Call, ScriptedBackend
from pacore.backends.base import Completion
from pacore.engine import asolve
from pacore.errors import UsageError
from pacore.eval.datasets import Problem
from pacore.eval.export import export_train, parse_range, synthesis_success
from pacore.eval.runner import Arm, run_dataset
from pacore.messages import compact
from pacore.rewards import compute_score
from pacore.store import RunStore
from pacore.trace import Trajectory

SYSTEM = {"role": "system", "content": "You are a careful mathematician.\n"}


def conversation(n: int) -> list[dict]:
    # History before the problem: it must reach the synthesis call untouched.
    return [
        SYSTEM,
        {"role": "user", "content": "Warm up: what is 1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": f"Problem {n}: what is {n} plus one?  \n"},
    ]


def problems(count: int) -> list[Problem]:
    return [Problem(id=f"q{n}", messages=conversation(n), answer=str(n + 1), kind="number") for n in range(count)]


def number(call: Call) -> int:
    return int(call.last_user_text.split("Problem ")[1].split(":")[0])


def sample(call: Call, i: int) -> str:
    """Sample i is right when i is odd; reasoning first, and a conclusion with leading blank lines."""
    n = number(call)
    return f"<think>sample {i} thinks</think>\n\nSample {i}: the answer is {n + 1 if i % 2 else 900 + i}"


async def pooled_run(run_dir: Path, count: int = 3, pool: int = 8) -> None:
    await run_dataset(
        run_dir, problems(count), dataset_path="data.jsonl", arm=Arm.build("majority", samples=1),
        backend=ScriptedBackend(respond=sample, max_n=pool), pool_size=pool,
    )  # fmt: skip


async def engine_synthesis_call(
    messages: list[dict], first_round: list[Completion] | list[Trajectory], seed: int, order: str = "shuffle"
) -> list[dict]:
    """The messages of the synthesis call the engine makes with ``first_round`` adopted, as a pooled run does."""
    backend = ScriptedBackend(respond=lambda call, i: "The answer is 1")
    await asolve(
        messages, schedule=[len(first_round)], backend=backend, seed=seed, reference_order=order,  # type: ignore[arg-type]
        first_round=first_round,
    )  # fmt: skip
    (call,) = backend.calls
    return call.messages


def pooled(run_dir: Path, problem_id: str, messages: list[str]) -> list[Trajectory]:
    """The pool trajectories whose messages are ``messages``, in that order (the drawn message set)."""
    with RunStore.open(run_dir) as store:
        by_message = {compact(t.text): t for t in store.pool(problem_id)}
    return [by_message[m] for m in messages]


def as_bytes(messages: list[dict]) -> list[tuple[bytes, bytes]]:
    return [(m["role"].encode(), m["content"].encode("utf-8")) for m in messages]


OPTIONS = {"min_acc": -1.0, "max_acc": 1.1, "min_size": 3, "max_size": 6}


@pytest.mark.parametrize("order", ["shuffle", "release"])
async def test_verl_and_trl_prompts_are_the_engines_synthesis_call(tmp_path: Path, order: str) -> None:
    await pooled_run(tmp_path / "run")
    for seed in (0, 7):
        export_train(tmp_path / "run", tmp_path / "p.jsonl", seed=seed, **OPTIONS)
        export_train(tmp_path / "run", tmp_path / "v.parquet", format="verl", seed=seed, order=order, **OPTIONS)  # type: ignore[arg-type]
        export_train(tmp_path / "run", tmp_path / "t.parquet", format="trl", seed=seed, order=order, **OPTIONS)  # type: ignore[arg-type]
        drawn = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
        verl = pq.read_table(tmp_path / "v.parquet").to_pylist()
        trl = pq.read_table(tmp_path / "t.parquet").to_pylist()
        assert (
            [r["id"] for r in drawn]
            == [r["extra_info"]["id"] for r in verl]
            == [r["id"] for r in trl]
            == ["q0", "q1", "q2"]
        )
        for record, row, trl_row in zip(drawn, verl, trl, strict=True):
            drawn_set = pooled(tmp_path / "run", record["id"], record["responses"])
            sent = await engine_synthesis_call(record["conversation"], drawn_set, seed, order)
            assert as_bytes(row["prompt"]) == as_bytes(sent)
            assert as_bytes(trl_row["prompt"]) == as_bytes(sent)
            assert row["prompt"][:3] == conversation(0)[:3]  # the history is kept as it was
            # The message-set indices point into the pool, in prompt order.
            pool_texts = {i: f"\n\nSample {i}: the answer is" for i in range(8)}
            prompt_text = row["prompt"][-1]["content"]
            positions = [prompt_text.index(pool_texts[i]) for i in row["extra_info"]["message_indices"]]
            assert positions == sorted(positions)
            assert len(row["extra_info"]["message_indices"]) == len(record["responses"])


async def test_verl_columns_and_the_reward_they_feed(tmp_path: Path) -> None:
    await pooled_run(tmp_path / "run")
    summary = export_train(tmp_path / "run", tmp_path / "v.parquet", format="verl", **OPTIONS)  # type: ignore[arg-type]
    assert summary.kept == 3
    table = pq.read_table(tmp_path / "v.parquet")
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    row = table.to_pylist()[1]
    assert row["data_source"] == "pacore/data" and row["ability"] == "math"
    assert row["reward_model"] == {"style": "rule", "ground_truth": "2"}
    extra = row["extra_info"]
    assert (extra["id"], extra["index"], extra["kind"], extra["split"]) == ("q1", 1, "number", "train")
    assert extra["problem"] == "Problem 1: what is 1 plus one?  \n"
    right = sum(int(i) % 2 for i in extra["message_indices"])
    assert extra["message_accuracy"] == pytest.approx(right / len(extra["message_indices"]))
    # verl's naive reward manager calls the reward with keywords and this row's columns.
    score = compute_score(
        data_source=row["data_source"], solution_str="So the answer is 2.", ground_truth=row["reward_model"]["ground_truth"],
        extra_info=extra,
    )  # fmt: skip
    assert score == 1.0
    assert compute_score(row["data_source"], "So the answer is 3.", row["reward_model"]["ground_truth"], extra) == 0.0


async def test_trl_export_loads_with_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")  # the dev extra installs it
    await pooled_run(tmp_path / "run")
    export_train(tmp_path / "run", tmp_path / "t.parquet", format="trl", **OPTIONS)  # type: ignore[arg-type]
    export_train(tmp_path / "run", tmp_path / "t.jsonl", format="trl", **OPTIONS)  # type: ignore[arg-type]
    from_parquet = datasets.load_dataset("parquet", data_files=str(tmp_path / "t.parquet"), split="train")
    from_json = datasets.load_dataset("json", data_files=str(tmp_path / "t.jsonl"), split="train")
    for loaded in (from_parquet, from_json):
        assert {"prompt", "ground_truth", "kind"} <= set(loaded.column_names)
        assert loaded["ground_truth"] == ["1", "2", "3"] and loaded["kind"] == ["number"] * 3
        assert loaded[0]["prompt"][-1]["role"] == "user"
    assert from_parquet["prompt"] == from_json["prompt"]


def write_train_file(path: Path) -> None:
    """The released PaCoRe-Train layout: conversation, responses (the pool), ground_truth."""
    records = [
        {"conversation": [{"role": "user", "content": "What is 6 times 7?"}],
         "responses": ["It is 42.", "The answer is 41.", "<think>6*7</think>\n42", "I think 40."], "ground_truth": "42"},
        {"conversation": [{"role": "user", "content": "What is 2 to the 5th?"}],
         "responses": ["32", "32", "32", "32"], "ground_truth": "32"},  # voting already wins: dropped
        {"conversation": [{"role": "user", "content": "No answer known"}], "responses": ["x"]},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


async def test_a_pacore_train_file_is_a_source(tmp_path: Path) -> None:
    data = tmp_path / "PaCoRe-Train-mini.jsonl"
    write_train_file(data)
    summary = export_train(data, tmp_path / "v.parquet", format="verl", max_acc=0.9, min_size=4, max_size=4)
    assert (summary.kept, summary.problems) == (1, 3)
    assert summary.dropped == {"with message accuracy >= 0.9": 1, "without ground truth": 1}
    assert "the responses of PaCoRe-Train-mini.jsonl" in summary.line()
    (row,) = pq.read_table(tmp_path / "v.parquet").to_pylist()
    assert row["data_source"] == "pacore/PaCoRe-Train-mini"
    assert row["extra_info"]["message_accuracy"] == 0.5
    assert sorted(row["extra_info"]["message_indices"]) == [0, 1, 2, 3]
    export_train(data, tmp_path / "p.jsonl", max_acc=0.9, min_size=4, max_size=4)
    (record,) = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert "\n42" in record["responses"]  # compacted, unstripped
    raw = {compact(r): r for r in ["It is 42.", "The answer is 41.", "<think>6*7</think>\n42", "I think 40."]}
    sent = await engine_synthesis_call(
        record["conversation"], [Completion(text=raw[m]) for m in record["responses"]], seed=0
    )
    assert as_bytes(row["prompt"]) == as_bytes(sent)


async def test_stage_two_keeps_problems_whose_synthesis_is_sometimes_right(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    await pooled_run(run_dir, count=3, pool=8)

    def synthesis(right: set[int]):
        def reply(call: Call, i: int) -> str:
            n = number(call)
            if "Reference Responses" in call.last_user_text or "Reference 1" in call.last_user_text:
                return f"The answer is {n + 1 if n in right else 0}"
            return sample(call, i)

        return reply

    # Two pacore arms stand for two repeats of the stage-1 policy: q0 always right, q1 once, q2 never.
    for schedule, right in (("4", {0, 1}), ("2", {0})):
        await run_dataset(
            run_dir, problems(3), dataset_path="data.jsonl", arm=Arm.build("pacore", schedule=schedule),
            backend=ScriptedBackend(respond=synthesis(right), max_n=8), pool_size=8,
        )  # fmt: skip
    assert synthesis_success(run_dir) == {"q0": (2, 2), "q1": (1, 2), "q2": (0, 2)}
    summary = export_train(run_dir, tmp_path / "s2.parquet", format="verl", synthesis_acc=(0.0, 1.0), **OPTIONS)  # type: ignore[arg-type]
    assert [r["extra_info"]["id"] for r in pq.read_table(tmp_path / "s2.parquet").to_pylist()] == ["q1"]
    assert summary.dropped == {"with synthesis success >= 1": 1, "with synthesis success <= 0": 1}
    # A data file needs the run that measured it.
    data = tmp_path / "train.jsonl"
    write_train_file(data)
    with pytest.raises(UsageError, match="--synthesis-run"):
        export_train(data, tmp_path / "x.parquet", format="verl", synthesis_acc=(0.0, 1.0))
    summary = export_train(
        data,
        tmp_path / "x.parquet",
        format="verl",
        synthesis_acc=(0.0, 1.0),
        synthesis_run=run_dir,
        max_acc=0.9,
        min_size=4,
    )
    assert summary.dropped["without a synthesis success rate"] == 1


async def test_images_are_kept_in_verls_multimodal_convention(tmp_path: Path) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "Problem 0: what is 0 plus one? See"}, image]}]
    await run_dataset(
        tmp_path / "run", [Problem(id="img", messages=messages, answer="1", kind="number")], dataset_path="d.jsonl",
        arm=Arm.build("majority", samples=1), backend=ScriptedBackend(respond=sample, max_n=4), pool_size=4,
    )  # fmt: skip
    export_train(tmp_path / "run", tmp_path / "v.parquet", format="verl", **OPTIONS)  # type: ignore[arg-type]
    (row,) = pq.read_table(tmp_path / "v.parquet").to_pylist()
    assert row["images"] == [{"image": "data:image/png;base64,iVBORw0KGgo="}]
    text = row["prompt"][-1]["content"]
    assert text.endswith("<image>") and "Problem 0: what is 0 plus one? See" in text and "Reference 1:" in text


def test_parse_range() -> None:
    assert parse_range("0..1") == (0.0, 1.0)
    assert parse_range(" 0.125 .. 0.875 ") == (0.125, 0.875)
    for bad in ("0-1", "1..0", "a..b", "0.5..0.5"):
        with pytest.raises(UsageError):
            parse_range(bad)


async def test_cli_formats_and_refusals(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    write_train_file(data)

    def export(*args: str) -> subprocess.CompletedProcess[str]:
        return pacore_in_process("export-train", str(data), *args)

    done = export("--format", "verl", "--out", str(tmp_path / "v.parquet"), "--max-acc", "0.9")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("export-train: kept 1 of 3 problems")
    assert len(pq.read_table(tmp_path / "v.parquet")) == 1
    for args, message in (
        (["--format", "csv", "--out", str(tmp_path / "x.csv")], "unknown export format 'csv'"),
        (["--format", "verl", "--out", str(tmp_path / "x.jsonl")], "give --out a .parquet file"),
        (["--format", "verl", "--out", str(tmp_path / "x.parquet"), "--synthesis-acc", "1..0"], "MIN < MAX"),
        (
            ["--format", "trl", "--out", str(tmp_path / "x.parquet"), "--order", "sorted"],
            "--reference-order must be one of",
        ),
        (["--out", str(tmp_path / "x.jsonl"), "--arm", "pacore-4"], "--arm applies to a run directory"),
    ):
        failed = export(*args)
        assert failed.returncode == 2 and message in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "x.jsonl").exists()


async def test_a_run_with_a_template_that_cannot_be_found_needs_template(tmp_path: Path) -> None:
    custom = tmp_path / "mine.j2"
    custom.write_text("Solve {{ original_prompt }} using:{% for r in ref_responses %} [{{ r }}]{% endfor %}")
    from pacore.prompts import SynthesisTemplate

    await run_dataset(
        tmp_path / "run", problems(2), dataset_path="data.jsonl", arm=Arm.build("majority", samples=1),
        backend=ScriptedBackend(respond=sample, max_n=4), pool_size=4, template=SynthesisTemplate.load(custom),
    )  # fmt: skip
    export_train(tmp_path / "run", tmp_path / "t.parquet", format="trl", **OPTIONS)  # type: ignore[arg-type]
    assert pq.read_table(tmp_path / "t.parquet").to_pylist()[0]["prompt"][-1]["content"].startswith("Solve Problem 0")
    custom.write_text("Changed since the run: {{ original_prompt }}{{ ref_responses }}")
    with pytest.raises(UsageError, match="pass it with --template"):
        export_train(tmp_path / "run", tmp_path / "t.parquet", format="trl", **OPTIONS)  # type: ignore[arg-type]
    export_train(tmp_path / "run", tmp_path / "t.parquet", format="trl", template=custom, **OPTIONS)  # type: ignore[arg-type]
    assert pq.read_table(tmp_path / "t.parquet").to_pylist()[0]["prompt"][-1]["content"].startswith("Changed since")
