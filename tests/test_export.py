"""``pacore export-train``: the released record layout, the accuracy filter, message-set sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_harness import pacore_in_process
from fakes import Call, ScriptedBackend
from pacore.errors import UsageError
from pacore.eval.datasets import Problem
from pacore.eval.export import export_train
from pacore.eval.runner import Arm, run_dataset


def problems(count: int, without_answer: tuple[int, ...] = ()) -> list[Problem]:
    return [
        Problem(
            id=f"q{n}",
            messages=[{"role": "user", "content": f"Problem {n}: what is {n} plus one?"}],
            answer=None if n in without_answer else str(n + 1),
            kind="gsm8k",
        )
        for n in range(count)
    ]


def pooled_replies(correct: dict[int, int]):
    """Sample i of problem n is right when i < correct[n]; every sample thinks first."""

    def reply(call: Call, i: int) -> str:
        n = int(call.last_user_text.split("Problem ")[1].split(":")[0])
        answer = n + 1 if i < correct.get(n, 0) else 999
        return f"<think>let me think about sample {i}</think>Sample {i}: the answer is {answer}"

    return reply


async def pooled_run(run_dir: Path, items: list[Problem], correct: dict[int, int], pool_size: int) -> None:
    backend = ScriptedBackend(respond=pooled_replies(correct), max_n=pool_size)
    await run_dataset(
        run_dir, items, dataset_path="d.jsonl", arm=Arm.build("majority", samples=1), backend=backend,
        pool_size=pool_size,
    )  # fmt: skip


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_records_follow_the_released_layout_and_the_exclusive_accuracy_filter(tmp_path: Path) -> None:
    # Pools of 8: message-set accuracy 0, 1/8, 3/8 (= the default bound) and 2/8; q4 has no answer.
    await pooled_run(tmp_path / "run", problems(5, without_answer=(4,)), {0: 0, 1: 1, 2: 3, 3: 2, 4: 4}, 8)
    summary = export_train(tmp_path / "run", tmp_path / "train.jsonl")
    records = read(tmp_path / "train.jsonl")
    assert [r["id"] for r in records] == ["q1", "q3"]
    assert (summary.kept, summary.problems) == (2, 5)
    assert summary.dropped == {
        "with message accuracy <= 0": 1, "with message accuracy >= 0.375": 1, "without ground truth": 1,
    }  # fmt: skip
    assert "kept 2 of 5 problems" in summary.line() and "the trajectory pool" in summary.line()
    first = records[0]
    assert set(first) == {"id", "conversation", "responses", "ground_truth"}
    assert first["conversation"] == [{"role": "user", "content": "Problem 1: what is 1 plus one?"}]
    assert first["ground_truth"] == "2"
    # Sizes 16..24 are clipped to the 8 pooled messages; each message is compacted.
    assert len(first["responses"]) == 8
    assert sorted(first["responses"]) == sorted(f"Sample {i}: the answer is {2 if i < 1 else 999}" for i in range(8))

    # The bounds are exclusive: moving them moves exactly the boundary problems.
    assert [r["id"] for r in read_export(tmp_path, max_acc=0.4)] == ["q1", "q2", "q3"]
    assert [r["id"] for r in read_export(tmp_path, min_acc=0.125)] == ["q3"]


def read_export(tmp_path: Path, **options) -> list[dict]:
    out = tmp_path / "custom.jsonl"
    export_train(tmp_path / "run", out, **options)
    return read(out)


async def test_message_set_sizes_are_drawn_uniformly_and_seeded(tmp_path: Path) -> None:
    await pooled_run(tmp_path / "run", problems(12), {n: 12 for n in range(12)}, 24)
    options = {"min_acc": 0.0, "max_acc": 1.0}
    first = read_export(tmp_path, **options)
    again = read_export(tmp_path, **options)
    other = read_export(tmp_path, seed=1, **options)
    sizes = [len(r["responses"]) for r in first]
    assert len(first) == 12 and all(16 <= size <= 24 for size in sizes)
    assert len(set(sizes)) > 1  # drawn, not fixed
    assert first == again and first != other
    assert all(len(set(r["responses"])) == len(r["responses"]) for r in first)  # no message twice
    fixed = read_export(tmp_path, min_size=20, max_size=20, **options)
    assert {len(r["responses"]) for r in fixed} == {20}


async def test_without_a_pool_the_widest_first_round_is_used(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    reply = pooled_replies({0: 1, 1: 1})

    def with_synthesis(call: Call, i: int) -> str:
        return "The answer is 5" if "Reference Responses" in call.last_user_text else reply(call, i)

    backend = ScriptedBackend(respond=with_synthesis, max_n=8)
    await run_dataset(
        run_dir, problems(2), dataset_path="d.jsonl", arm=Arm.build("majority", samples=2), backend=backend
    )
    await run_dataset(
        run_dir, problems(2), dataset_path="d.jsonl", arm=Arm.build("pacore", schedule="4"), backend=backend,
        add_arm=True,
    )  # fmt: skip
    summary = export_train(run_dir, tmp_path / "train.jsonl", max_acc=0.5)
    assert "arm pacore-4" in summary.source
    assert [len(r["responses"]) for r in read(tmp_path / "train.jsonl")] == [4, 4]
    summary = export_train(run_dir, tmp_path / "train.jsonl", max_acc=0.6, arm="majority-2")
    assert [len(r["responses"]) for r in read(tmp_path / "train.jsonl")] == [2, 2]


async def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    await pooled_run(tmp_path / "run", problems(1), {0: 1}, 2)
    with pytest.raises(UsageError, match="--min-acc < --max-acc"):
        export_train(tmp_path / "run", tmp_path / "t.jsonl", min_acc=0.5, max_acc=0.5)
    with pytest.raises(UsageError, match="--min-size <= --max-size"):
        export_train(tmp_path / "run", tmp_path / "t.jsonl", min_size=10, max_size=5)
    process = pacore_in_process(
        "export-train", str(tmp_path / "run"), "--out", str(tmp_path / "t.jsonl"), "--arm", "nope"
    )
    assert process.returncode == 2 and "has no arm 'nope'" in process.stderr
    assert not (tmp_path / "t.jsonl").exists()


async def test_cli_prints_the_summary(tmp_path: Path) -> None:
    await pooled_run(tmp_path / "run", problems(2), {0: 1, 1: 0}, 4)
    process = pacore_in_process("export-train", str(tmp_path / "run"), "--out", str(tmp_path / "out" / "train.jsonl"))
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith("export-train: kept 1 of 2 problems")
    assert "1 with message accuracy <= 0" in process.stdout
    assert "not judged" not in process.stdout  # every answer was compared
    assert [r["id"] for r in read(tmp_path / "out" / "train.jsonl")] == ["q0"]


def test_answers_graded_wrong_without_being_judged_are_counted_in_the_summary(tmp_path: Path) -> None:
    """The accuracy filter counts an answer too heavy to compare as wrong; the summary says how many."""
    heavy, right, wrong = r"So \boxed{9^{9^{9}}}", r"So \boxed{5}", r"So \boxed{7}"
    records = [
        {"id": "mixed", "conversation": [{"role": "user", "content": "What is 2 + 3?"}], "ground_truth": "5",
         "kind": "math", "responses": [right, heavy, heavy, wrong]},
        {"id": "solved", "conversation": [{"role": "user", "content": "And 3 + 2?"}], "ground_truth": "5",
         "kind": "math", "responses": [right, right, right, heavy]},
    ]  # fmt: skip
    data = tmp_path / "train-file.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = export_train(data, tmp_path / "t.jsonl", format="trl", max_acc=0.5, min_size=4, max_size=4)
    # Judged wrong (7) is not counted; the three heavy answers of both drawn sets are, kept problem or not.
    assert summary.not_judged == {"answer too heavy to compare symbolically": 3}
    assert summary.dropped == {"with message accuracy >= 0.5": 1}
    (row,) = read(tmp_path / "t.jsonl")
    assert (row["id"], row["message_accuracy"]) == ("mixed", 0.25)
    assert summary.line().endswith(
        "; 3 answers not judged (graded wrong): 3 × answer too heavy to compare symbolically"
    )
    process = pacore_in_process(
        "export-train", str(data), "--out", str(tmp_path / "p.jsonl"), "--max-acc", "0.5", "--min-size", "4"
    )
    assert process.returncode == 0, process.stderr
    assert "; 3 answers not judged (graded wrong): 3 × answer too heavy" in process.stdout
