"""``pacore report`` on a small scripted run: the numbers, the diagnostics and the files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fakes import Call, ScriptedBackend, fail
from pacore.eval.datasets import Problem
from pacore.eval.report import CROSS_CHECK, wilson_interval
from pacore.eval.runner import Arm, run_dataset

PACORE = shutil.which("pacore", path=str(Path(sys.executable).parent)) or shutil.which("pacore")

# Per problem: the two first-round replies and the synthesis. q0: all right, the
# synthesis cross-checks; q1: every input wrong, the synthesis right (emergent,
# fixes the majority); q2: inputs right, the synthesis wrong (breaks it).
SCRIPT = {
    0: (["The answer is 1", "I get 1"], "Reference 1 and ref 2 agree: the answer is 1"),
    1: (["The answer is 7", "It is 7"], "Both references are wrong; the answer is 2"),
    2: (["The answer is 3", "So 3"], "The answer is 9"),
}
FAILING = 3  # every call about this problem fails


def number(call: Call) -> int:
    return int(call.last_user_text.split("Problem ")[1].split(":")[0])


def reply(call: Call, i: int):
    n = number(call)
    if n == FAILING:
        return fail("status", "upstream said <b>busy</b>")
    first_round, synthesis = SCRIPT[n]
    if "Reference Responses" in call.last_user_text:
        return synthesis
    return first_round[i % 2]


def words(text: str) -> int:
    return len(text.split())


PROBLEMS = [
    Problem(id=f"q{n}", messages=[{"role": "user", "content": f"Problem {n}: what is {n} plus one?"}],
            answer=str(n + 1), kind="gsm8k", line=n + 1)  # fmt: skip
    for n in range(4)
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import asyncio

    path = tmp_path_factory.mktemp("report") / "run"
    backend = ScriptedBackend(respond=reply, max_n=2)

    async def both_arms() -> None:
        await run_dataset(path, PROBLEMS, dataset_path="d.jsonl", arm=Arm.build("pacore", schedule="2"), backend=backend)
        await run_dataset(
            path, PROBLEMS, dataset_path="d.jsonl", arm=Arm.build("majority", samples=2), backend=backend,
            add_arm=True,
        )  # fmt: skip

    asyncio.run(both_arms())
    return path


def report_json(*args: str) -> dict:
    assert PACORE
    env = {k: v for k, v in os.environ.items() if k != "PACORE_DEBUG"}
    process = subprocess.run([PACORE, "report", *args, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout)


def test_wilson_interval_matches_known_values() -> None:
    low, high = wilson_interval(2, 4)
    assert low == pytest.approx(0.1500, abs=1e-4) and high == pytest.approx(0.8500, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_cross_check_pattern() -> None:
    for text in ("As Reference 3 says", "ref 2 is wrong", "Reference #1", "references 1 and 2", "Ref. 4"):
        assert CROSS_CHECK.search(text), text
    for text in ("no references here", "I refer to the problem", "reference solution"):
        assert not CROSS_CHECK.search(text), text


def test_report_numbers_per_arm(run_dir: Path) -> None:
    document = report_json(str(run_dir))
    methods = {m["arm"]: m for m in document["methods"]}
    assert set(methods) == {"pacore-2", "majority-2"}

    pacore = methods["pacore-2"]
    assert (pacore["method"], pacore["schedule"], pacore["problems"]) == ("pacore", "2", 4)
    assert (pacore["answered"], pacore["failed"], pacore["graded"], pacore["correct"]) == (3, 1, 3, 2)
    assert pacore["accuracy"] == pytest.approx(2 / 3)
    assert pacore["ci_low"] == pytest.approx(0.2077, abs=1e-4)
    assert pacore["ci_high"] == pytest.approx(0.9385, abs=1e-4)
    expected_ttc = sum(words(a) + words(b) + words(s) for (a, b), s in SCRIPT.values()) / 3
    assert pacore["mean_completion_tokens"] == pytest.approx(expected_ttc)
    assert pacore["mean_prompt_tokens"] > 0
    assert "<b>busy</b>" in pacore["failure_reasons"][0]["reason"]

    synthesis = pacore["synthesis"]
    assert synthesis["synthesized"] == 3
    assert (synthesis["majority_wrong"], synthesis["fixed"]) == (1, 1)
    assert (synthesis["majority_right"], synthesis["broke"]) == (2, 1)
    assert (synthesis["all_inputs_wrong"], synthesis["emergent_correct"]) == (1, 1)
    assert synthesis["emergent_correctness_rate"] == 1.0
    assert synthesis["cross_checking_frequency"] == pytest.approx(1 / 3)

    majority = methods["majority-2"]
    assert (majority["schedule"], majority["samples"], majority["correct"], majority["graded"]) == (None, 2, 2, 3)
    assert majority["mean_completion_tokens"] == pytest.approx(
        sum(words(a) + words(b) for (a, b), _ in SCRIPT.values()) / 3
    )
    assert majority["synthesis"] is None


def test_report_files_hold_the_numbers(run_dir: Path, tmp_path: Path) -> None:
    document = report_json(str(run_dir), "--out", str(tmp_path))
    assert document["files"]["markdown"] == str(tmp_path / "report.md")
    markdown = (tmp_path / "report.md").read_text()
    assert "| pacore-2 | pacore | 2 | 4 | 3 | 1 | 66.7% [20.8%, 93.9%] (2/3) |" in markdown
    assert "| majority-2 | majority | k=2 |" in markdown
    assert "1/1 (100.0%)" in markdown  # emergent correctness
    assert "accuracy_vs_ttc.png" in markdown
    page = (tmp_path / "report.html").read_text()
    assert "66.7% [20.8%, 93.9%] (2/3)" in page
    assert "&lt;b&gt;busy&lt;/b&gt;" in page and "<b>busy</b>" not in page
    assert "data:image/png;base64," in page
    png = (tmp_path / "accuracy_vs_ttc.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000


def test_report_defaults_to_the_first_run_dir_and_compares_runs(run_dir: Path, tmp_path: Path) -> None:
    document = report_json(str(run_dir), str(run_dir))
    assert len(document["methods"]) == 4 and {m["run"] for m in document["methods"]} == {str(run_dir)}
    assert (run_dir / "report.md").is_file() and (run_dir / "report.html").is_file()
    assert "| run |" in (run_dir / "report.md").read_text()


def test_report_on_a_directory_without_a_run_is_a_usage_error(tmp_path: Path) -> None:
    process = subprocess.run([PACORE, "report", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert process.returncode == 2
    assert process.stderr.startswith("pacore: error: ") and "not a run directory" in process.stderr
    assert len(process.stderr.strip().splitlines()) == 1


def test_a_run_with_nothing_answered_yet_still_reports(tmp_path: Path) -> None:
    from pacore.eval.report import write_report
    from pacore.store import ArmInfo, RunInfo, RunStore, StoredProblem

    with RunStore.open(tmp_path / "run", writer=True) as store:
        store.init_run(RunInfo("d.jsonl", "f", 1, {}), [StoredProblem("q0", 0, [], "1", "gsm8k")])
        store.add_arm(ArmInfo("pacore-4", "pacore", "4"), ["q0"])
    arms, files = write_report([tmp_path / "run"])
    (arm,) = arms
    assert (arm.problems, arm.pending, arm.answered, arm.accuracy, arm.mean_completion_tokens) == (1, 1, 0, None, None)
    assert "| pacore-4 | pacore | 4 | 1 | 0 | 0 (+1 pending) | n/a |" in files.markdown.read_text()
    assert files.plot.read_bytes().startswith(b"\x89PNG")
