"""Answer extraction, graders and majority voting."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacore.errors import UsageError
from pacore.eval import extract_answer, grade, majority_vote
from pacore.eval.grading import KINDS, GradeVerdict, boxed_answer, equivalent, format_note_counts, grade_verdict

# (response, ground truth, kind, expected grade)
GRADES = [
    # math equivalence through math-verify
    (r"So \boxed{\frac{1}{2}}", "0.5", "auto", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", "math", True),
    (r"\boxed{\dfrac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", "math", True),
    (r"\boxed{\frac{3}{4}}", "3/4", "auto", True),
    (r"\boxed{x=3}", "3", "math", True),
    (r"\boxed{3}", "x = 3", "math", True),
    (r"the interval is \boxed{(0, 1]}", "(0,1]", "math", True),
    (r"\boxed{[0,1]}", "(0,1]", "math", False),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", "math", True),
    (r"\boxed{2\pi}", r"\pi", "math", False),
    (r"\boxed{50\%}", "0.5", "math", True),
    (r"\boxed{\frac{1}{3}}", "0.5", "auto", False),
    # the boxed answer wins over stray numbers after it; nested braces survive
    (r"The answer is \boxed{3}. Check: 3 + 4 = 7", "3", "auto", True),
    (r"\boxed{\frac{\sqrt{3}}{2}} (about 0.866)", r"\frac{\sqrt3}{2}", "math", True),
    (r"\fbox{42}", "42", "auto", True),
    # GSM8K numerics
    ("The answer is 1,000.", "1000", "gsm8k", True),
    ("The answer is $18.00", "18", "gsm8k", True),
    ("She makes 18 dollars every day.", "18", "gsm8k", True),
    ("Total: 9 * 2 = 18\n#### 18", "18", "gsm8k", True),
    ("**Answer:** 72", "72", "gsm8k", True),
    ("The answer is 18.0", "18", "number", True),
    ("The answer is 50%", "50", "gsm8k", True),
    ("So the answer is 18 dollars. Let me double-check: 18 + 0 = 18.", "18", "auto", True),
    ("The answer is 3.5. Indeed 7/2 = 3.5.", "7/2", "auto", True),
    ("Answer: 180", "18", "gsm8k", False),
    ("Answer: 18", "180", "gsm8k", False),
    (r"\boxed{-5}", "5", "auto", False),
    (r"\boxed{2x}", "2", "auto", False),
    ("It took 3 hours, then 5 more, so 8 in total.", "8", "gsm8k", True),
    # units and text answers (the reference release's sample answers)
    (r"The area is \boxed{32}", "32 cm²", "auto", True),
    ("It rises 20 m. Answer: 20 m", "20 meters", "auto", True),
    (r"Final answer: \text{Box B}", "Box B", "auto", True),
    ("Final answer: Box C", "Box B", "auto", False),
    # multiple choice
    ("The answer is (B).", "B", "choice", True),
    ("B) is right", "B", "choice", True),
    ("The answer is b", "B", "choice", True),
    ("The answer is b", "(B)", "auto", True),
    (r"\boxed{\text{(D)}}", "D", "choice", True),
    ("The answer is a bit unclear; I pick (C)", "B", "auto", False),
    ("Answer: C", "B", "choice", False),
    # exact match
    ("Paris", "paris", "exact", True),
    ("  The   answer: New York ", "new york", "exact", True),
    ("Paris, France", "paris", "exact", False),
    # nothing to grade
    (None, "3", "auto", False),
    ("", "3", "auto", False),
    ("   ", "3", "gsm8k", False),
    ("I don't know.", "3", "gsm8k", False),
    (r"\boxed{3}", None, "auto", False),
    (r"\boxed{3}", "", "auto", False),
]


@pytest.mark.parametrize(("response", "truth", "kind", "expected"), GRADES)
def test_grade_table(response: str | None, truth: str | None, kind: str, expected: bool) -> None:
    assert grade(response, truth, kind) is expected


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        (r"first \boxed{1} then \boxed{\frac{a}{b^{2}}}", "auto", r"\frac{a}{b^{2}}"),
        (r"\boxed {7}", "auto", "7"),
        ("The answer is $\\frac{1}{2}$.", "math", r"\frac{1}{2}"),
        ("blah\n#### 1,234", "gsm8k", "1234"),
        ("The answer is $18.00 per day.", "gsm8k", "18"),
        ("We get 5 + 3 = 8", "gsm8k", "8"),
        ("I computed 2.5 and then 1/4", "auto", "1/4"),
        ("no numbers here\nBox B.", "auto", "Box B"),
        ("no numbers at all", "math", None),
        ("A long closing line of prose that states no answer whatsoever, at length.", "auto", None),
        ("The answer is (E).", "choice", "E"),
        ("Option c.", "choice", "C"),
        ("nothing chosen", "choice", None),
        (None, "auto", None),
    ],
)
def test_extract_answer(text: str | None, kind: str, expected: str | None) -> None:
    assert extract_answer(text, kind) == expected


def test_boxed_answer_handles_unbalanced_braces() -> None:
    assert boxed_answer(r"\boxed{\frac{1}{2}") is None
    assert boxed_answer(r"\boxed{3} but then \boxed{\frac{1}{") == "3"  # cut off mid-answer
    assert boxed_answer(r"\boxed{1} and \fbox{2}") == "2"
    assert boxed_answer("plain text") is None


def test_giant_numbers_do_not_raise() -> None:
    huge = "9" * 5000  # int() and str() refuse over 4300 digits
    assert grade(f"#### {huge}", "9", "gsm8k") is False
    assert grade(f"Answer: 1/{huge}", "1", "auto") is False
    assert majority_vote([f"#### {huge}", f"#### {huge}"], "number") == (huge, 2)


# Model output is arbitrary: LaTeX fragments, numbers, letters, broken braces.
model_text = st.lists(
    st.sampled_from(
        ["\\boxed{", "\\fbox{", "{", "}", "\\frac", "^", "!", "=", "$", "%", ",", ".", "(", ")", "[", "]",
         "answer is ", "Answer: ", "#### ", "<think>", "</think>", " ", "\n", "x", "B", "1", "2", "9", "0.5"]
    )
    | st.text(max_size=5),
    max_size=20,
).map("".join)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(response=model_text, truth=model_text, kind=st.sampled_from(KINDS))
def test_grading_never_raises_on_model_output(response: str, truth: str, kind: str) -> None:
    assert isinstance(grade(response, truth, kind), bool)
    answer = extract_answer(response, kind)
    assert answer is None or isinstance(answer, str)
    voted, count = majority_vote([response, truth], kind)
    assert (voted is None) == (count == 0)


def test_unknown_kind_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown grading kind 'maths'"):
        grade("1", "1", "maths")


def test_equivalent_compares_bare_answers() -> None:
    assert equivalent("1,000", "1000.00", "number")
    assert equivalent("$1{,}000", "1000")
    assert not equivalent("1,00", "100", "number")  # not a thousands separator


@pytest.mark.parametrize(
    "tower",
    [r"9^{9^{9}}", r"10^{10^{10}}", r"(10^{100})!", r"(x+1)^{9999}", r"2**2**2**40", "x" * 5000],
)
def test_pathological_answers_finish_fast_in_a_worker_thread(tower: str) -> None:
    """Outside the main thread math-verify has no timeout; screening must keep sympy away, and says so."""
    outcome: list[GradeVerdict] = []
    cpu_seconds: list[float] = []

    def grade_it() -> None:
        started = time.thread_time()  # this thread's CPU: a loaded machine's waits do not count
        outcome.append(grade_verdict(rf"\boxed{{{tower}}}", "5", "math"))
        cpu_seconds.append(time.thread_time() - started)

    worker = threading.Thread(target=grade_it)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "grading hung"
    assert outcome == [GradeVerdict(False, "answer too heavy to compare symbolically")]
    assert cpu_seconds[0] < 5
    assert grade(rf"\boxed{{{tower}}}", "5", "math") is False
    assert grade_verdict(r"\boxed{5}", tower, "math") == GradeVerdict(
        False, "ground truth too heavy to compare symbolically"
    )


@pytest.mark.parametrize(
    ("response", "truth", "kind"),
    [(r"\boxed{2\pi}", r"\pi", "math"), ("Answer: 180", "18", "gsm8k"), ("Answer: C", "B", "choice"),
     ("Paris, France", "paris", "exact"), ("I don't know.", "3", "gsm8k"), (None, "3", "auto")],
)  # fmt: skip
def test_an_answer_compared_and_found_wrong_has_no_note(response: str | None, truth: str, kind: str) -> None:
    assert grade_verdict(response, truth, kind) == GradeVerdict(False)
    assert grade_verdict(r"\boxed{\frac{1}{2}}", "0.5", "math") == GradeVerdict(True)


def test_grade_notes_with_their_counts_read_as_the_report_and_export_show_them() -> None:
    notes = [("comparison cut after 20 s", 3), ("answer too heavy to compare symbolically", 1)]
    assert format_note_counts(notes) == "3 × comparison cut after 20 s, 1 × answer too heavy to compare symbolically"
    assert format_note_counts([]) == ""


NESTED = "\\sin(\\cos(" * 22 + "x" + "))" * 22  # passes the screening; sympy spends seconds on it


# The alarm's exception can be raised inside a weakref callback sympy triggers, where Python
# swallows it (an "unraisable" exception): that step then runs to its end. Seen in loaded test runs.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_math_verify_timeout_in_the_main_thread_is_a_note(monkeypatch) -> None:
    """math-verify's own timeouts (SIGALRM) end a step it spends too long on: the grade says so."""
    from pacore.eval import grading

    monkeypatch.setattr(grading, "_VERIFY_TIMEOUT_S", 1)
    # Another variable each time: sympy caches what it computed, so the same expression again is fast.
    for variable in "xzw":
        verdict = grade_verdict(rf"\boxed{{{NESTED.replace('x', variable)}}}", "y", "math")
        if verdict.note is not None:
            break
    assert verdict == GradeVerdict(False, "math-verify timed out (1 s a step)")


def test_math_verify_works_in_a_worker_thread() -> None:
    outcome: list[bool] = []
    worker = threading.Thread(target=lambda: outcome.append(grade(r"\boxed{\frac{2}{4}}", "0.5", "math")))
    worker.start()
    worker.join(timeout=30)
    assert outcome == [True]


def verdict_in_a_thread(response: str, truth: str) -> list[GradeVerdict]:
    outcome: list[GradeVerdict] = []
    worker = threading.Thread(target=lambda: outcome.append(grade_verdict(response, truth, "math")))
    worker.start()
    worker.join(timeout=120)
    return outcome


def test_a_comparison_overrunning_off_the_main_thread_is_cut_and_graded_wrong(monkeypatch, caplog) -> None:
    """Off the main thread math-verify runs in a child process, ended past its bound; the next call starts another."""
    from pacore.eval import grading

    assert grading._safe_for_sympy(NESTED)
    assert verdict_in_a_thread(r"\boxed{\frac{2}{4}}", "0.5") == [GradeVerdict(True)]  # the child is up
    monkeypatch.setattr(grading, "_VERIFY_TIMEOUT_S", 0)  # math-verify's own timeouts off: only the bound cuts
    monkeypatch.setattr(grading, "_OVERRUN_SLACK_S", 1)
    with caplog.at_level(logging.WARNING, logger="pacore.eval"):
        assert verdict_in_a_thread(rf"\boxed{{{NESTED}}}", "y") == [GradeVerdict(False, "comparison cut after 1 s")]
    assert "math grading: comparison cut after 1 s comparing" in caplog.text and "graded incorrect" in caplog.text
    monkeypatch.undo()
    assert verdict_in_a_thread(r"\boxed{(x+1)^2}", "x^2+2x+1") == [GradeVerdict(True)]  # a new child


def test_a_grader_process_that_dies_mid_comparison_is_a_note(monkeypatch) -> None:
    from pacore.eval import grading

    assert verdict_in_a_thread(r"\boxed{\frac{2}{4}}", "0.5") == [GradeVerdict(True)]  # the child is up
    child = grading._verify_process._process
    assert child is not None
    monkeypatch.setattr(grading, "_VERIFY_TIMEOUT_S", 0)  # nothing cuts the comparison but the kill below
    monkeypatch.setattr(grading, "_OVERRUN_SLACK_S", 60)
    killer = threading.Timer(1.0, child.kill)
    killer.start()
    try:
        outcome = verdict_in_a_thread(rf"\boxed{{{NESTED}}}", "y")
    finally:
        killer.cancel()
    assert outcome == [GradeVerdict(False, "grader process failed: its process ended (exit code -9)")]
    monkeypatch.undo()
    assert verdict_in_a_thread(r"\boxed{(x+1)^2}", "x^2+2x+1") == [GradeVerdict(True)]  # a new child


async def test_grading_inside_the_event_loop() -> None:
    assert grade(r"\boxed{\sqrt{4}}", "2", "math")


def test_majority_vote_groups_equal_numbers() -> None:
    texts = ["The answer is 18.", "#### 1,000", r"\boxed{18.0}", "1000", "$1,000.00", None, "no idea"]
    assert majority_vote(texts, "gsm8k") == ("1000", 3)


def test_majority_vote_ties_go_to_the_first_answer() -> None:
    assert majority_vote(["Answer: 7", "Answer: 9", "Answer: 9.0", "Answer: 7"]) == ("7", 2)


def test_majority_vote_text_and_choice() -> None:
    assert majority_vote(["Answer: Box B", "answer: box b", "Answer: Box C"]) == ("Box B", 2)
    assert majority_vote(["The answer is (A)", "Answer: b", "B) for sure"], "choice") == ("B", 2)


def test_majority_vote_without_answers() -> None:
    assert majority_vote([]) == (None, 0)
    assert majority_vote([None, "", "no idea"], "number") == (None, 0)


def test_a_grader_process_answering_something_else_than_a_verdict_is_replaced() -> None:
    import subprocess
    import sys

    from pacore.eval import grading

    grading._verify_process._stop()
    talker = "import sys\nfor line in sys.stdin: print('hello', flush=True)"  # taken for a child already up
    grading._verify_process._process = subprocess.Popen(
        [sys.executable, "-c", talker], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    outcome = verdict_in_a_thread(r"\boxed{\frac{2}{4}}", "x/2")
    assert outcome == [GradeVerdict(False, "grader process failed: it answered 'hello', not a verdict")]
    assert verdict_in_a_thread(r"\boxed{\frac{2}{4}}", "0.5") == [GradeVerdict(True)]  # a new child


def test_off_posix_math_verify_keeps_its_own_timeouts_in_any_thread(monkeypatch) -> None:
    """Without POSIX pipes to supervise a child, a worker thread calls math-verify with its timeouts (a process
    per step on Windows), never the child process."""
    from pacore.eval import grading

    calls: list[int] = []
    monkeypatch.setattr(grading.os, "name", "nt")
    monkeypatch.setattr(
        grading, "_verify", lambda predicted, truth, timeout: calls.append(timeout) or grading.GradeVerdict(True)
    )
    monkeypatch.setattr(grading._verify_process, "verdict", lambda *args: pytest.fail("no child process off POSIX"))
    outcome: list[bool] = []
    worker = threading.Thread(target=lambda: outcome.append(grade(r"\boxed{\frac{2}{4}}", "x/2", "math")))
    worker.start()
    worker.join(timeout=60)
    assert outcome == [True]
    assert calls == [grading._VERIFY_TIMEOUT_S]


@pytest.mark.parametrize(
    ("answer", "truth", "kind"),
    [(r"\frac{1}{2}", "0.5", "math"), (r"\sqrt{2}", r"\sqrt{2}", "auto"), ("18", "18", "gsm8k"), ("B", "B", "choice")],
)
def test_an_answer_already_extracted_is_compared_as_it_is(answer: str, truth: str, kind: str) -> None:
    assert grade_verdict(answer, truth, kind, extracted=True) == GradeVerdict(True)
    assert not grade_verdict(answer, "7", kind, extracted=True).correct


def test_a_program_that_graded_off_the_main_thread_ends_its_grader_process_on_exit() -> None:
    """The supervised math-verify child ends with the program: no child left running, no pipe left open."""
    import os
    import subprocess
    import sys

    from cli_harness import environment

    code = (
        "import threading\n"
        "from pacore.eval import grading\n"
        "verdicts = []\n"
        "thread = threading.Thread(target=lambda: verdicts.append(grading.grade_verdict(r'\\boxed{\\sqrt{4}}', '2')))\n"
        "thread.start(); thread.join()\n"
        "print(verdicts[0].correct, grading._verify_process._process.pid)\n"
    )
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "always::ResourceWarning", "-c", code],
        capture_output=True, text=True, timeout=300, env=environment(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    correct, pid = done.stdout.split()
    assert correct == "True" and "ResourceWarning" not in done.stderr, done.stderr
    with pytest.raises(ProcessLookupError):  # reaped, not left running
        os.kill(int(pid), 0)
