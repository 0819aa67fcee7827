"""Grading: whether a response states the ground-truth answer.

Answers are extracted by :mod:`pacore.answers` (re-exported here, where
callers have long imported them). Grading kinds:

- ``number`` (alias ``gsm8k``): the answers are numbers; ``"1,000"``,
  ``"$18.00"``, ``"18 dollars"`` and ``"18"`` are all 18;
- ``math``: symbolic equivalence through math-verify (fractions, roots,
  percentages, intervals, sets, equations such as ``x=3``...);
- ``choice``: a multiple-choice letter A-E (``"(B)"``, ``"B)"``, ``"the answer is b"``);
- ``exact``: the same text after normalizing case, whitespace and wrappers;
- ``auto``: a letter A-E as ground truth means ``choice``, anything else is
  compared as a number, then as normalized text, then with math-verify.

Every function here is safe to call from any thread and never raises on
model output. On POSIX math-verify's own timeouts use ``SIGALRM`` and so run
only in the main thread: elsewhere it runs in a child process (see
:class:`_VerifyProcess`), ended when a comparison overruns (on Windows its
timeouts start a process per step, in any thread); the
screening in :func:`_safe_for_sympy` keeps it away from inputs that never
finish in the first place.

An answer that could not be compared (screened out, timed out, cut, or its
grader process failed) grades ``False``; :func:`grade_verdict` says why, so a
batch run can tell such answers from wrong ones (:class:`GradeVerdict`).
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pacore._extras import require

# Re-exported: the extraction API has long been imported from here.
from pacore.answers import (  # noqa: F401
    KINDS,
    NUMERIC_KINDS,
    GradingKind,
    as_number,
    boxed_answer,
    check_kind,
    extract_answer,
    extract_choice,
    majority_vote,
    normalized_text,
)

# math-verify gets at most this many characters per side: longer "answers"
# are prose, and sympy's time grows quickly with the expression.
MAX_VERIFY_CHARS = 300
# Seconds per parse / comparison, main thread only: math-verify's own default. It is wall time, so
# a busy machine spends part of it elsewhere: with 2 s, a right answer was graded wrong under load.
_VERIFY_TIMEOUT_S = 5
# Off the main thread a comparison (two parses and a verify, each bounded in the child process as in
# the main thread) may take this much longer than their timeouts: past it the child is ended, the answer
# graded wrong without a verdict. What no SIGALRM interrupts (a long step inside C code) is cut so.
_OVERRUN_SLACK_S = 5
# Seconds the child process may take to start (it imports sympy, a second or two).
_START_LIMIT_S = 120

logger = logging.getLogger("pacore.eval")

_CHOICE_GROUND_TRUTH = re.compile(r"^\W*[A-E]\W*$")


def _resolve(kind: str, ground_truth: str) -> str:
    if kind == "auto" and _CHOICE_GROUND_TRUTH.match(ground_truth):
        return "choice"
    return kind


@dataclass(frozen=True, slots=True)
class GradeVerdict:
    """A grade, and why it was not really judged when it was not."""

    correct: bool
    #: Why the answers could not be compared, so ``correct`` is ``False`` without a verdict
    #: (``"comparison cut after 20 s"``, ``"answer too heavy to compare symbolically"``...);
    #: ``None`` when they were compared.
    note: str | None = None


def format_note_counts(counts: Iterable[tuple[str, int]]) -> str:
    """Grade notes (:attr:`GradeVerdict.note`) with how often each occurred: ``"3 × comparison cut after 20 s, 1 × ..."``."""
    return ", ".join(f"{count} × {note}" for note, count in counts)


def grade(response_text: str | None, ground_truth: str | None, kind: str = "auto") -> bool:
    """Whether the answer stated in ``response_text`` is equivalent to ``ground_truth``.

    ``ground_truth`` is the bare answer (``"18"``, ``"\\frac{1}{2}"``, ``"B"``);
    a missing ground truth or response grades ``False``. :func:`grade_verdict`
    also says when an answer graded ``False`` could not be compared.
    """
    return grade_verdict(response_text, ground_truth, kind).correct


def grade_verdict(
    response_text: str | None, ground_truth: str | None, kind: str = "auto", *, extracted: bool = False
) -> GradeVerdict:
    """:func:`grade`'s grade with, when the answers could not be compared, why (see :class:`GradeVerdict`).

    With ``extracted``, ``response_text`` is an answer already extracted from its
    response (a majority vote's): it is compared as it is, not searched again for
    an answer (the last number of ``\\frac{1}{2}`` is ``2``).
    """
    kind = check_kind(kind)
    if ground_truth is not None and not isinstance(ground_truth, str):
        ground_truth = str(ground_truth)  # numbers from JSON or parquet columns
    if not ground_truth or not ground_truth.strip() or not response_text:
        return GradeVerdict(False)
    kind = _resolve(kind, ground_truth)
    if kind == "choice":
        expected = extract_choice(ground_truth)
        return GradeVerdict(expected is not None and extract_choice(response_text) == expected)
    predicted = response_text.strip() if extracted else extract_answer(response_text, kind)
    if kind == "exact":
        candidates = {normalized_text(response_text)}
        if predicted is not None:
            candidates.add(normalized_text(predicted))
        return GradeVerdict(normalized_text(ground_truth) in candidates)
    if predicted is None:
        return GradeVerdict(False)
    return _equivalence(predicted, ground_truth, kind)


def equivalent(predicted: str, ground_truth: str, kind: str = "auto") -> bool:
    """Whether two bare answers are equal as numbers, as text, or (math/auto) symbolically."""
    return _equivalence(predicted, ground_truth, kind).correct


def _equivalence(predicted: str, ground_truth: str, kind: str) -> GradeVerdict:
    expected_number = as_number(ground_truth)
    predicted_number = as_number(predicted)
    if expected_number is not None and predicted_number is not None:
        if expected_number == predicted_number:
            return GradeVerdict(True)
        if kind in NUMERIC_KINDS:
            return GradeVerdict(False)
    if normalized_text(predicted) == normalized_text(ground_truth):
        return GradeVerdict(True)
    if kind == "exact":
        return GradeVerdict(False)
    return _math_verify_verdict(predicted, ground_truth)


# --- math-verify, guarded -----------------------------------------------------

_NESTED_POWER = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\(?[^{}\s()]*\^|\*\*[^*]*\*\*")
_POWER = re.compile(r"(\S)\s*(?:\^|\*\*)\s*[{(]?\s*(\d+)")
_BIG_FACTORIAL = re.compile(r"(?:\d{5,}|[)}])\s*!")
_BIG_LITERAL = re.compile(r"\d{200,}")
_HEAVY_COMMANDS = ("\\binom", "\\choose", "\\prod", "\\uparrow")


def _safe_for_sympy(text: str) -> bool:
    """Screen out answers sympy could spend unbounded time or memory on.

    Power towers (``9^{9^{9}}``), huge exponents or factorials never finish,
    and expanding ``(x+1)^{999}`` takes minutes; outside the main thread
    only ending the child process that compares them (:class:`_VerifyProcess`) would.
    """
    return not (
        len(text) > MAX_VERIFY_CHARS
        or _NESTED_POWER.search(text)
        or any(_heavy_power(base, exponent) for base, exponent in _POWER.findall(text))
        or _BIG_FACTORIAL.search(text)
        or _BIG_LITERAL.search(text)
        or any(command in text for command in _HEAVY_COMMANDS)
    )


def _heavy_power(base: str, exponent: str) -> bool:
    # Numbers to a power are cheap up to a point; symbols to a big power are not.
    return len(exponent) >= 5 or (len(exponent) >= 2 and not base.isdigit())


def _math_verify_verdict(predicted: str, ground_truth: str) -> GradeVerdict:
    for side, text in (("answer", predicted), ("ground truth", ground_truth)):
        if not _safe_for_sympy(text):
            return GradeVerdict(False, f"{side} too heavy to compare symbolically")
    require("eval", "math_verify", feature="math grading")
    if threading.current_thread() is threading.main_thread() or os.name != "posix":
        # math-verify's own timeouts hold: SIGALRM in the main thread; off POSIX, a process per step, in any thread.
        return _verify(predicted, ground_truth, _VERIFY_TIMEOUT_S)
    return _verify_process.verdict(predicted, ground_truth, _VERIFY_TIMEOUT_S)


def _verify(predicted: str, ground_truth: str, timeout: int) -> GradeVerdict:
    """math-verify's verdict, each step bounded by ``timeout`` seconds (``SIGALRM``: main thread only)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    targets = [LatexExtractionConfig(), ExprExtractionConfig()]
    timed_out = GradeVerdict(False, f"math-verify timed out ({timeout} s a step)")
    try:
        # raise_on_error: a timeout is told apart from a failure, which is "not equal" as before.
        gold = parse("\\boxed{" + ground_truth + "}", targets, parsing_timeout=timeout, raise_on_error=True)
        guess = parse("\\boxed{" + predicted + "}", targets, parsing_timeout=timeout, raise_on_error=True)
    except TimeoutException:  # a BaseException
        return timed_out
    except Exception:  # math-verify and sympy fail in many ways on odd text; that is "not equal"
        return GradeVerdict(False)
    # verify's own loop over every pair, so that a timed-out pair is known; a failing one is "not equal".
    cut = False
    for gold_form, guess_form in itertools.product(gold, guess):
        try:
            if verify(gold_form, guess_form, timeout_seconds=timeout, raise_on_error=True):
                return GradeVerdict(True)
        except TimeoutException:
            cut = True
        except Exception:
            pass
    return timed_out if cut else GradeVerdict(False)


def serve_verdicts() -> None:
    """The child process of :class:`_VerifyProcess`: reads ``[predicted, ground_truth, timeout]`` JSON lines
    on stdin, answers each with ``[correct, note]`` on stdout, :func:`_verify` running in its main thread."""
    import math_verify  # noqa: F401 - imported before saying ready, so no comparison pays for it

    print("ready", flush=True)
    for line in sys.stdin:
        predicted, ground_truth, timeout = json.loads(line)
        verdict = _verify(predicted, ground_truth, timeout)
        print(json.dumps([verdict.correct, verdict.note]), flush=True)


class _VerifyProcess:
    """math-verify for callers off the main thread, in a child process that is ended when it overruns.

    A thread cannot be stopped and ``SIGALRM`` reaches only the main thread, so
    an answer sympy chews on for long (``\\sin(\\cos(...))`` nested twenty
    deep takes seconds) would hold its caller, a batch run's store worker say,
    for as long. The child (a plain ``python -c``: nothing of the caller's
    ``__main__`` is run again, as multiprocessing's ``spawn`` would) is started
    on first use, serves one comparison at a time, and is replaced after an overrun.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None

    def verdict(self, predicted: str, ground_truth: str, timeout: int) -> GradeVerdict:
        limit_s = 3 * timeout + _OVERRUN_SLACK_S
        with self._lock:
            try:
                process = self._started()
                assert process.stdin is not None
                process.stdin.write(json.dumps([predicted, ground_truth, timeout]) + "\n")
                process.stdin.flush()
                line = self._line(process, limit_s)
                if line is not None:
                    return self._parsed(line)
                why = f"comparison cut after {limit_s:g} s"
            except OSError as exc:  # the child died (killed, out of memory...), could not start or talks nonsense
                why = f"grader process failed: {exc}"
            self._stop()
        logger.warning("math grading: %s comparing %r with %r: graded incorrect", why, predicted, ground_truth)
        return GradeVerdict(False, why)

    @staticmethod
    def _parsed(line: str) -> GradeVerdict:
        try:
            correct, note = json.loads(line)
        except ValueError:
            raise OSError(f"it answered {line[:80]!r}, not a verdict") from None
        return GradeVerdict(bool(correct), note)

    @staticmethod
    def _line(process: subprocess.Popen[str], limit_s: float) -> str | None:
        """The child's next line, or ``None`` past ``limit_s``; an ended child is an OSError."""
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], limit_s)
        if not ready:
            return None
        line = process.stdout.readline()
        if not line:
            raise OSError(f"its process ended (exit code {process.wait()})")
        return line.strip()

    def _started(self) -> subprocess.Popen[str]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._stop()
        # The child imports this very pacore, wherever the caller found it.
        path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from pacore.eval.grading import serve_verdicts; serve_verdicts()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": path},
        )  # fmt: skip
        if self._line(self._process, _START_LIMIT_S) != "ready":
            raise OSError("its process did not start")
        return self._process

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.communicate()  # reaped, its pipes closed


_verify_process = _VerifyProcess()
# Ended with its parent's interpreter, not left to it: that warns of a child still running and its open pipes.
atexit.register(_verify_process._stop)
