"""``pacore report`` on a small scripted run: the numbers, the diagnostics and the files.

The command runs in-process (``pacore_in_process``): these tests are about what it writes, and a
subprocess would import matplotlib anew for each (other tests run the real ``pacore report``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_harness import pacore_in_process
from fakes import Call, ScriptedBackend, fail
from pacore.eval.datasets import Problem
from pacore.eval.report import CROSS_CHECK, wilson_interval
from pacore.eval.runner import Arm, run_dataset

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
    Problem(
        id=f"q{n}",
        messages=[{"role": "user", "content": f"Problem {n}: what is {n} plus one?"}],
        answer=str(n + 1),
        kind="gsm8k",
        line=n + 1,
    )  # fmt: skip
    for n in range(4)
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import asyncio

    path = tmp_path_factory.mktemp("report") / "run"
    backend = ScriptedBackend(respond=reply, max_n=2)

    async def both_arms() -> None:
        await run_dataset(
            path, PROBLEMS, dataset_path="d.jsonl", arm=Arm.build("pacore", schedule="2"), backend=backend
        )
        await run_dataset(
            path, PROBLEMS, dataset_path="d.jsonl", arm=Arm.build("majority", samples=2), backend=backend,
            add_arm=True,
        )  # fmt: skip

    asyncio.run(both_arms())
    return path


def report_json(*args: str) -> dict:
    process = pacore_in_process("report", *args, "--json")
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
    assert synthesis["not_judged"] == 0

    majority = methods["majority-2"]
    assert (majority["schedule"], majority["samples"], majority["correct"], majority["graded"]) == (None, 2, 2, 3)
    assert majority["mean_completion_tokens"] == pytest.approx(
        sum(words(a) + words(b) for (a, b), _ in SCRIPT.values()) / 3
    )
    assert majority["synthesis"] is None
    # Every answer was compared: nothing graded without a verdict, and the report says nothing about it.
    assert [(m["not_judged"], m["not_judged_notes"]) for m in document["methods"]] == [(0, []), (0, [])]
    assert "without being judged" not in (run_dir / "report.md").read_text()


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
    process = pacore_in_process("report", str(tmp_path / "nothing"))
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


def test_repeat_interval_is_a_normal_approximation_over_problems() -> None:
    from pacore.eval.report import repeat_interval

    # Per-problem accuracies 0.75, 0.5, 0.25: mean 0.5, s = 0.25, half width 1.96 * 0.25 / sqrt(3).
    low, high = repeat_interval([0.75, 0.5, 0.25])
    assert low == pytest.approx(0.5 - 0.282897, abs=1e-5) and high == pytest.approx(0.5 + 0.282897, abs=1e-5)
    assert repeat_interval([0.9, 1.0]) == pytest.approx((0.8520, 1.0), abs=1e-4)  # clamped at 1
    assert repeat_interval([0.5]) is None


def test_repeats_average_per_problem_then_over_problems(tmp_path: Path) -> None:
    from pacore.eval.report import arm_report
    from pacore.store import ArmInfo, ProblemResult

    # q0: 4 repeats, 3 right; q1: 2 repeats, 0 right (one more failed); q2: 1 repeat, right.
    outcomes = {"q0": [True, True, True, False], "q1": [False, False, None], "q2": [True]}
    results = [
        ProblemResult(p, "failed" if c is None else "done", correct=c, completion_tokens=10, repeat=i,
                      error="boom" if c is None else None)
        for p, cs in outcomes.items() for i, c in enumerate(cs)
    ]  # fmt: skip
    arm = arm_report("run", ArmInfo("majority-2", "majority", None, 2), results)
    assert (arm.problems, arm.results, arm.repeats, arm.answered, arm.failed) == (3, 8, 4, 7, 1)
    assert (arm.graded, arm.correct) == (7, 4)
    assert arm.accuracy == pytest.approx((0.75 + 0 + 1) / 3)  # not 4/7: every problem weighs the same
    assert arm.interval == pytest.approx((0.0, 1.0))  # three very different problems: wide, clamped
    figures = arm.as_dict()
    assert (figures["repeats"], figures["results"], figures["interval_method"]) == (
        4, 8, "normal approximation over problems",
    )  # fmt: skip
    single = arm_report("run", ArmInfo("single", "single"), [ProblemResult("q0", "done", correct=True)])
    assert (single.repeats, single.interval_method, single.accuracy) == (1, "wilson", 1.0)


def test_report_json_gives_repeats_per_arm(tmp_path: Path) -> None:
    import asyncio

    def reply(call: Call, i: int) -> str:
        return "The answer is 1" if i % 2 == 0 else "The answer is 5"

    path = tmp_path / "run"
    problems = [Problem(id=f"q{n}", messages=[{"role": "user", "content": f"Problem {n}"}], answer="1",
                        kind="gsm8k", line=n + 1) for n in range(3)]  # fmt: skip
    backend = ScriptedBackend(respond=reply, max_n=4)
    asyncio.run(run_dataset(path, problems, dataset_path="d.jsonl", arm=Arm.build("single"), backend=backend,
                            pool_size=4, repeats=5))  # fmt: skip
    (figures,) = report_json(str(path))["methods"]
    assert (figures["problems"], figures["results"], figures["repeats"]) == (3, 15, 5)
    assert figures["interval_method"] == "normal approximation over problems"
    assert 0 <= figures["ci_low"] <= figures["accuracy"] <= figures["ci_high"] <= 1
    # Pool samples alternate right and wrong: each problem's accuracy is its share of right draws.
    from pacore.store import RunStore

    with RunStore.open(path) as store:
        grades: dict[str, list[bool]] = {}
        for result in store.results("single"):
            grades.setdefault(result.problem_id, []).append(bool(result.correct))
    assert figures["accuracy"] == pytest.approx(sum(sum(g) / len(g) for g in grades.values()) / 3)
    markdown = (path / "report.md").read_text()
    assert "| single | single | off | 3 × 5 repeats | 15 | 0 |" in markdown
    assert f"({figures['correct']}/15 over 3 problems)" in markdown
    assert "normal-approximation interval over problems" in markdown
    text = pacore_in_process("report", str(path))
    assert text.returncode == 0, text.stderr
    assert "on 15 graded results of 3 problems (mean over repeats)" in text.stdout


def test_report_opens_with_the_run_and_ends_with_every_problem(run_dir: Path, tmp_path: Path) -> None:
    import csv

    document = report_json(str(run_dir), "--out", str(tmp_path))
    assert document["files"]["csv"] == str(tmp_path / "report.csv")
    markdown = (tmp_path / "report.md").read_text()
    for line in ("- model: scripted", "- backend: scripted", f"- data set: {Path('d.jsonl').resolve()} (4 problems)",
                 "- pacore version: ", "- run created: 20", "- wall time: "):  # fmt: skip
        assert line in markdown, line
    assert "temperature 1.0" in markdown.split("- settings: ")[1].splitlines()[0]
    assert markdown.index("## Run ") < markdown.index("## Accuracy and compute") < markdown.index("## Per-problem")
    assert "| pacore-2 | q2 | 0 | 0 | done | 9 | 3 | wrong |" in markdown
    assert "| majority-2 | q1 | 0 | 0 | done | 7 | 2 | wrong |" in markdown
    assert "| pacore-2 | q3 | 0 | 0 | failed |  | 4 |  | 0 | 0 |" in markdown

    with (tmp_path / "report.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8 and {r["run"] for r in rows} == {str(run_dir)}
    by_key = {(r["arm"], r["problem"]): r for r in rows}
    assert (by_key["pacore-2", "q1"]["extracted answer"], by_key["pacore-2", "q1"]["grade"]) == ("2", "correct")
    assert by_key["pacore-2", "q0"]["completion tokens"] == str(sum(map(words, SCRIPT[0][0])) + words(SCRIPT[0][1]))
    assert by_key["majority-2", "q3"]["status"] == "failed" and "<b>busy</b>" in by_key["majority-2", "q3"]["error"]
    assert all(float(r["time (s)"]) >= 0 for r in rows)

    page = (tmp_path / "report.html").read_text()
    assert "<dt>model</dt><dd>scripted</dd>" in page
    assert "<h2>Per-problem results</h2>" in page and "<td>q2</td>" in page
    assert "<b>busy</b>" not in page
    assert not list(tmp_path.glob(".*.tmp"))  # written through temporary files, none left behind


def test_wall_time_is_first_start_to_last_finish_not_the_sum() -> None:
    from pacore.eval.report import arm_report, summary_rows
    from pacore.store import ArmInfo, ProblemResult

    # Two problems of 60 s each, the second started 30 s after the first: 90 s of real time.
    results = [
        ProblemResult("q0", "done", wall_s=60.0, updated_at="2026-01-02T10:01:00.000+00:00"),
        ProblemResult("q1", "done", wall_s=60.0, updated_at="2026-01-02T10:01:30.000+00:00"),
        ProblemResult("q2", "pending"),
    ]
    arm = arm_report("run", ArmInfo("single", "single"), results)
    assert arm.elapsed_s == 90.0 and arm.sum_wall_s == 120.0
    figures = arm.as_dict()
    assert (figures["wall_s"], figures["sum_problem_wall_s"]) == (90.0, 120.0)
    assert figures["first_start"] == "2026-01-02T10:00:00+00:00"
    assert figures["last_finish"] == "2026-01-02T10:01:30+00:00"
    header, (row,) = summary_rows([arm], with_run=False)
    cells = dict(zip(header, row, strict=True))
    assert cells["wall time (first start to last finish)"] == "1m 30s"
    assert cells["sum of problem times"] == "120.0s"
    nothing = arm_report("run", ArmInfo("single", "single"), [ProblemResult("q0", "pending")])
    assert nothing.elapsed_s is None and summary_rows([nothing], False)[1][0][-2] == "n/a"


def test_plot_separates_tied_points_and_labels_each(tmp_path: Path) -> None:
    from pacore.eval.report import ArmReport, plot_points, render_plot

    def arm(name: str, method: str, tokens: float, correct: int, schedule: str | None = None) -> ArmReport:
        return ArmReport(run="r", arm=name, method=method, schedule=schedule, samples=None, graded=4,
                         correct=correct, mean_completion_tokens=tokens,
                         problem_accuracies=[1.0] * correct + [0.0] * (4 - correct))  # fmt: skip

    arms = [arm("pacore-4", "pacore", 1000, 2, "4"), arm("pacore-4b", "pacore", 1000, 2, "4"),
            arm("single", "single", 1000, 2), arm("pacore-8", "pacore", 2000, 3, "8")]  # fmt: skip
    series = plot_points(arms, with_run=False)
    points = [p for ps in series.values() for p in ps]
    tied = [p for p in points if p.arm.mean_completion_tokens == 1000]
    assert len({p.x for p in tied}) == 3  # three arms at the same place are drawn apart
    assert all(abs(p.x / 1000 - 1) < 0.05 for p in tied)  # ... by a small offset
    assert sorted(p.tie for p in tied) == [0, 1, 2]
    assert {p.label for p in tied} == {"pacore-4", "pacore-4b", "single"}  # each named, by its arm
    (alone,) = [p for p in points if p.arm.arm == "pacore-8"]
    assert (alone.x, alone.y, alone.label, alone.tie) == (2000, 75.0, "8", 0)
    assert plot_points(arms, with_run=False) == series  # deterministic
    render_plot(arms, tmp_path / "plot.png", with_run=False)
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_tables_of_several_runs_start_with_the_run_column() -> None:
    from pacore.eval.report import arm_report, spurious_rows, summary_rows, synthesis_rows
    from pacore.store import ArmInfo, ProblemResult

    arms = [arm_report(run, ArmInfo("single", "single"), [ProblemResult("q0", "done")]) for run in ("r1", "r2")]
    header, rows = summary_rows(arms, with_run=True)
    assert header[:2] == ["run", "arm"] and [row[:2] for row in rows] == [["r1", "single"], ["r2", "single"]]
    assert summary_rows(arms, with_run=False)[1] == [row[1:] for row in rows]
    # single arms have no synthesis or verifier figures: those tables keep their header and have no rows
    for table in (synthesis_rows, spurious_rows):
        header, rows = table(arms, with_run=True)
        assert header[:2] == ["run", "arm"] and rows == []


def test_answers_graded_incorrect_without_being_judged_are_stored_and_reported(tmp_path: Path, monkeypatch) -> None:
    """A comparison cut in the grader's child process and an answer too heavy for sympy are graded wrong,
    as before, but the run store keeps why and the report counts them apart from answers judged wrong."""
    import asyncio
    import csv

    from pacore.eval import grading
    from pacore.store import RunStore

    nested = "\\sin(\\cos(" * 22 + "x" + "))" * 22  # passes the screening; sympy spends seconds on it
    replies = {0: rf"So \boxed{{{nested}}}", 1: r"So \boxed{9^{9^{9}}}", 2: "Answer: 180", 3: "The answer is 4"}
    problems = [
        Problem(id="cut", messages=[{"role": "user", "content": "Problem 0"}], answer="y", kind="math", line=1),
        Problem(id="heavy", messages=[{"role": "user", "content": "Problem 1"}], answer="5", kind="math", line=2),
        Problem(id="wrong", messages=[{"role": "user", "content": "Problem 2"}], answer="18", kind="gsm8k", line=3),
        Problem(id="right", messages=[{"role": "user", "content": "Problem 3"}], answer="4", kind="gsm8k", line=4),
    ]
    backend = ScriptedBackend(respond=lambda call, i: replies[int(call.last_user_text.split()[-1])])
    # The runner grades off the main thread, in math-verify's child process: with its own timeouts off,
    # only the overrun bound (1 s) cuts the nested comparison.
    monkeypatch.setattr(grading, "_VERIFY_TIMEOUT_S", 0)
    monkeypatch.setattr(grading, "_OVERRUN_SLACK_S", 1)
    path = tmp_path / "run"
    summary = asyncio.run(run_dataset(path, problems, dataset_path="d.jsonl", arm=Arm.build("single"), backend=backend))
    monkeypatch.undo()
    assert (summary.graded, summary.correct, summary.not_judged) == (4, 1, 2)
    from pacore.cli.run_display import summary_text

    assert "accuracy 25.0% (1/4) (2 graded incorrect without being judged: see pacore report)" in summary_text(
        summary, path
    )

    with RunStore.open(path) as store:
        stored = {r.problem_id: (r.correct, r.grade_note) for r in store.results("single")}
    assert stored == {
        "cut": (False, "comparison cut after 1 s"),
        "heavy": (False, "answer too heavy to compare symbolically"),
        "wrong": (False, None),
        "right": (True, None),
    }

    (figures,) = report_json(str(path))["methods"]
    assert (figures["graded"], figures["correct"], figures["not_judged"]) == (4, 1, 2)
    assert sorted((n["note"], n["count"]) for n in figures["not_judged_notes"]) == [
        ("answer too heavy to compare symbolically", 1), ("comparison cut after 1 s", 1),
    ]  # fmt: skip
    markdown = (path / "report.md").read_text()
    assert "Graded incorrect without being judged" in markdown
    line = next(line for line in markdown.splitlines() if line.startswith("- single: "))
    assert line.startswith("- single: 2 of 4 graded results; 1 × ")
    assert "1 × comparison cut after 1 s" in line and "1 × answer too heavy to compare symbolically" in line
    assert markdown.index(line) < markdown.index("accuracy_vs_ttc.png")  # read with the accuracy table
    assert "<li>single: 2 of 4 graded results; 1 × " in (path / "report.html").read_text()
    with (path / "report.csv").open(newline="") as file:
        grades = {row["problem"]: row["grade"] for row in csv.DictReader(file)}
    assert grades == {
        "cut": "wrong (not judged: comparison cut after 1 s)",
        "heavy": "wrong (not judged: answer too heavy to compare symbolically)",
        "wrong": "wrong",
        "right": "correct",
    }
    text = pacore_in_process("report", str(path))
    assert text.returncode == 0, text.stderr
    assert "accuracy 25.0%" in text.stdout and ", 2 graded incorrect without being judged" in text.stdout


def test_synthesis_diagnostics_count_the_messages_they_graded_wrong_without_judging(tmp_path: Path) -> None:
    """Inputs too heavy for sympy count as wrong in the diagnostics (here: an emergent correctness);
    the report says how many messages that was, apart from the results' own not-judged count."""
    import asyncio

    heavy = [r"So \boxed{9^{9^{9}}}", r"Thus \boxed{9^{9^{9}}}"]

    def heavy_inputs(call: Call, i: int) -> str:
        if "Reference Responses" in call.last_user_text or "Problem right" in call.last_user_text:
            return r"The answer is \boxed{5}"
        return heavy[i % 2]

    problems = [
        Problem(id=name, messages=[{"role": "user", "content": f"Problem {name}"}], answer="5", kind="math", line=n)
        for n, name in enumerate(("heavy", "right"), 1)
    ]  # fmt: skip
    backend = ScriptedBackend(respond=heavy_inputs, max_n=2)
    path = tmp_path / "run"
    asyncio.run(
        run_dataset(path, problems, dataset_path="d.jsonl", arm=Arm.build("pacore", schedule="2"), backend=backend)
    )
    (figures,) = report_json(str(path))["methods"]
    assert (figures["graded"], figures["correct"], figures["not_judged"]) == (2, 2, 0)  # the final answers
    synthesis = figures["synthesis"]
    # The two inputs could not be compared: taken as wrong (the synthesis, right, was compared).
    assert synthesis["not_judged"] == 2
    assert (synthesis["all_inputs_wrong"], synthesis["emergent_correct"]) == (1, 1)
    markdown = (path / "report.md").read_text()
    section = markdown[markdown.index("## Synthesis diagnostics") :]
    assert "Trajectory messages these diagnostics graded incorrect without being judged" in section
    assert "\n- pacore-2: 2 messages\n" in section
    assert "Graded incorrect without being judged" not in markdown  # no result was
    assert "<li>pacore-2: 2 messages</li>" in (path / "report.html").read_text()


def test_synthesis_diagnostics_grade_the_majority_of_the_inputs_as_the_answer_it_is(tmp_path: Path) -> None:
    r"""Both inputs say \frac{1}{2}, and so does the synthesis: the majority was right and was kept
    (searched again for an answer, the voted \frac{1}{2} would read 2: "majority wrong, fixed")."""
    import asyncio

    problem = Problem(
        id="half", messages=[{"role": "user", "content": "Half?"}], answer=r"\frac{1}{2}", kind="math", line=1
    )
    backend = ScriptedBackend(respond=lambda call, i: r"It is \boxed{\frac{1}{2}}", max_n=2)
    path = tmp_path / "run"
    asyncio.run(
        run_dataset(path, [problem], dataset_path="d.jsonl", arm=Arm.build("pacore", schedule="2"), backend=backend)
    )
    synthesis = report_json(str(path))["methods"][0]["synthesis"]
    assert (synthesis["synthesized"], synthesis["majority_right"], synthesis["broke"]) == (1, 1, 0)
    assert (synthesis["majority_wrong"], synthesis["fixed"]) == (0, 0)
