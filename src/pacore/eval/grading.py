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

Every function here is safe to call from any thread (math-verify's own
timeouts use ``SIGALRM`` and so run only in the main thread; elsewhere the
screening in :func:`_safe_for_sympy` keeps it away from inputs that never
finish) and never raises on model output.
"""

from __future__ import annotations

import logging
import re
import threading

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

_CHOICE_GROUND_TRUTH = re.compile(r"^\W*[A-E]\W*$")


def _resolve(kind: str, ground_truth: str) -> str:
    if kind == "auto" and _CHOICE_GROUND_TRUTH.match(ground_truth):
        return "choice"
    return kind


def grade(response_text: str | None, ground_truth: str | None, kind: str = "auto") -> bool:
    """Whether the answer stated in ``response_text`` is equivalent to ``ground_truth``.

    ``ground_truth`` is the bare answer (``"18"``, ``"\\frac{1}{2}"``, ``"B"``);
    a missing ground truth or response grades ``False``.
    """
    kind = check_kind(kind)
    if ground_truth is not None and not isinstance(ground_truth, str):
        ground_truth = str(ground_truth)  # numbers from JSON or parquet columns
    if not ground_truth or not ground_truth.strip() or not response_text:
        return False
    kind = _resolve(kind, ground_truth)
    if kind == "choice":
        expected = extract_choice(ground_truth)
        return expected is not None and extract_choice(response_text) == expected
    predicted = extract_answer(response_text, kind)
    if kind == "exact":
        candidates = {normalized_text(response_text)}
        if predicted is not None:
            candidates.add(normalized_text(predicted))
        return normalized_text(ground_truth) in candidates
    if predicted is None:
        return False
    return equivalent(predicted, ground_truth, kind)


def equivalent(predicted: str, ground_truth: str, kind: str = "auto") -> bool:
    """Whether two bare answers are equal as numbers, as text, or (math/auto) symbolically."""
    expected_number = as_number(ground_truth)
    predicted_number = as_number(predicted)
    if expected_number is not None and predicted_number is not None:
        if expected_number == predicted_number:
            return True
        if kind in NUMERIC_KINDS:
            return False
    if normalized_text(predicted) == normalized_text(ground_truth):
        return True
    if kind == "exact":
        return False
    return _math_verify_equal(predicted, ground_truth)


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
    nothing can interrupt them.
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


_quiet_once = threading.Lock()
_quieted = False


def _timeouts() -> int | None:
    """math-verify's signal-based timeout in the main thread; ``None`` elsewhere."""
    global _quieted
    if threading.current_thread() is threading.main_thread():
        return _VERIFY_TIMEOUT_S
    with _quiet_once:
        if not _quieted:
            # It warns that timeouts are off; that is our deliberate choice here.
            for name in ("math_verify.parser", "math_verify.grader"):
                logging.getLogger(name).setLevel(logging.ERROR)
            _quieted = True
    return None


def _math_verify_equal(predicted: str, ground_truth: str) -> bool:
    if not (_safe_for_sympy(predicted) and _safe_for_sympy(ground_truth)):
        return False
    require("eval", "math_verify", feature="math grading")
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    timeout = _timeouts()
    targets = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:
        gold = parse("\\boxed{" + ground_truth + "}", extraction_config=targets, parsing_timeout=timeout)
        guess = parse("\\boxed{" + predicted + "}", extraction_config=targets, parsing_timeout=timeout)
        if not gold or not guess:
            return False
        return bool(verify(gold, guess, timeout_seconds=timeout))
    except Exception:  # math-verify and sympy fail in many ways on odd text; that is "not equal"
        return False
