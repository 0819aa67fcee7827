"""Answer extraction and grading.

Grading kinds:

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
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Literal, get_args

from pacore._extras import require
from pacore.errors import UsageError

GradingKind = Literal["auto", "math", "number", "gsm8k", "choice", "exact"]
KINDS: tuple[str, ...] = get_args(GradingKind)
_NUMERIC_KINDS = ("number", "gsm8k")

# math-verify gets at most this many characters per side: longer "answers"
# are prose, and sympy's time grows quickly with the expression.
MAX_VERIFY_CHARS = 300
_VERIFY_TIMEOUT_S = 2  # seconds per parse / comparison, main thread only

_BOX_OPENING = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_PHRASE = re.compile(
    r"answer\s*\**\s*(?:is\s*:?|:|=)\s*\**[ \t]*([^\n]+)", re.IGNORECASE
)
_MAX_BARE_ANSWER_CHARS = 60  # a longer last line is prose, not an answer
_SENTENCE_END = re.compile(r"\.\s")  # "18. Let me check" ends at "18"; "3.5" does not end
_HASHES = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_CHOICE_AFTER_PHRASE = re.compile(
    r"answer\s*\**\s*(?:is\s*:?|:|=)?\s*\**\s*(?:option\s*|choice\s*)?[(\[]?([A-Ea-e])[)\]]?"
    r"(?=\s*(?:$|[.,;:!*)\]\n]))",  # a lone "a" must end the phrase: "the answer is a bit..." is no choice
    re.IGNORECASE,
)
_CHOICE_MARKED = re.compile(r"(?<![A-Za-z])\(?([A-E])\)(?![A-Za-z])")
_CHOICE_ALONE = re.compile(r"^\W*(?:option\s*|choice\s*)?([A-Ea-e])\W*$", re.IGNORECASE)
_CHOICE_GROUND_TRUTH = re.compile(r"^\W*[A-E]\W*$")

_VARIABLE_PREFIX = re.compile(r"^[A-Za-z]\w*\s*=\s*")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textnormal|operatorname)\s*\{([^{}]*)\}")
_LATEX_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
# After a number: nothing, %/°, or unit words set apart by a space ("2x" is not 2).
_UNIT_TAIL = re.compile(r"^\s*[%°]?(?:\s+[A-Za-z²³µΩ][A-Za-z²³µΩ/.' ]*)?$")
_LATEX_PLAIN = (("\\%", "%"), ("\\$", "$"), ("{,}", ","), ("\\left", ""), ("\\right", ""))
_CURRENCY = "$€£¥₹"
_DECORATED_NUMBER = re.compile(
    r"^([-+]?)\s*[" + re.escape(_CURRENCY) + r"]?\s*([\d.,]+)(?:\s*/\s*(\d+))?(.*)$", re.DOTALL
)
_MAX_NUMBER_DIGITS = 1000  # longer is not an answer (and int() refuses over 4300 digits)
_GROUPED = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def boxed_answer(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` / ``\\fbox{...}``, nested braces included."""
    # One pass with a stack of open braces, so a looping output full of
    # unclosed boxes costs linear time.
    box_braces = {match.end() - 1 for match in _BOX_OPENING.finditer(text)}
    if not box_braces:
        return None
    open_braces: list[int] = []
    found: tuple[int, int] | None = None
    for i, char in enumerate(text):
        if char == "{":
            open_braces.append(i)
        elif char == "}" and open_braces:
            opened = open_braces.pop()
            if opened in box_braces and (found is None or opened > found[0]):
                found = (opened, i)
    return text[found[0] + 1 : found[1]].strip() if found is not None else None


def _clean(answer: str) -> str:
    """Strip the decoration around a stated answer (markdown, ``$``, a final period)."""
    previous = None
    while previous != answer:
        previous = answer
        answer = answer.strip().strip("*").rstrip(".").strip()
        for opening, closing in (("\\(", "\\)"), ("\\[", "\\]"), ("$", "$")):
            wrapped = answer.startswith(opening) and answer.endswith(closing)
            inner = answer[len(opening) : -len(closing)]
            if wrapped and len(answer) > len(opening + closing) and (opening != "$" or "$" not in inner):
                answer = inner
    boxed = boxed_answer(answer)
    return boxed if boxed is not None else answer


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(" ", "") if numbers else None


def _extract_choice(text: str) -> str | None:
    boxed = boxed_answer(text)
    if boxed is not None:
        letter = _CHOICE_ALONE.match(_strip_latex(boxed))
        if letter:
            return letter.group(1).upper()
    phrases = _CHOICE_AFTER_PHRASE.findall(text)
    if phrases:
        return phrases[-1].upper()
    alone = _CHOICE_ALONE.match(text.strip())
    if alone:
        return alone.group(1).upper()
    marked = _CHOICE_MARKED.findall(text)
    return marked[-1] if marked else None


def extract_answer(text: str | None, kind: str = "auto") -> str | None:
    """The final answer stated in ``text``, or ``None`` when it states none.

    In order: the last ``\\boxed{}`` / ``\\fbox{}``; the last ``#### X``,
    ``answer is X`` or ``Answer: X``; then the last number (for ``exact``
    and ``auto``, a short last line when there is no number). For ``choice`` the
    result is an upper-case letter A-E; for ``number`` / ``gsm8k`` a number.
    """
    kind = _check_kind(kind)
    if not text or not text.strip():
        return None
    if kind == "choice":
        return _extract_choice(text)
    stated = boxed_answer(text)
    if stated is None:
        for pattern in (_HASHES, _ANSWER_PHRASE):
            matches = pattern.findall(text)
            if matches:
                stated = _clean(_SENTENCE_END.split(matches[-1], maxsplit=1)[0])
                break
    if kind in _NUMERIC_KINDS:
        return _numeric_answer(stated if stated is not None else _last_number(text))
    if stated:
        return stated
    number = _last_number(text)
    if number is not None or kind == "math":
        return number
    last_line = _clean([line for line in text.strip().splitlines() if line.strip()][-1])
    return last_line if 0 < len(last_line) <= _MAX_BARE_ANSWER_CHARS else None


def _numeric_answer(stated: str | None) -> str | None:
    """A stated answer as a canonical number (``"$1,000.00"`` gives ``"1000"``)."""
    if stated is None:
        return None
    value = _as_number(stated)
    if value is None:
        last = _last_number(stated)
        value = _as_number(last) if last is not None else None
    return stated if value is None else _number_text(value)


def _number_text(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    decimal = Decimal(value.numerator) / Decimal(value.denominator)
    return str(decimal) if Fraction(decimal) == value else f"{value.numerator}/{value.denominator}"


def _strip_latex(text: str) -> str:
    previous = None
    while previous != text:
        previous, text = text, _TEXT_WRAPPER.sub(r"\1", text)
    text = _LATEX_SPACING.sub(" ", text)
    for latex, plain in _LATEX_PLAIN:
        text = text.replace(latex, plain)
    return text


def _as_number(answer: str) -> Fraction | None:
    """``answer`` as an exact number if it is one, possibly with currency, %, units or ``x =``."""
    text = _strip_latex(answer).strip()
    text = text.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\circ", "")
    text = _VARIABLE_PREFIX.sub("", text).strip().strip(_CURRENCY + " ").rstrip(".")
    match = _DECORATED_NUMBER.match(text)
    if not match:
        return None
    sign, digits, denominator, tail = match.groups()
    if not _UNIT_TAIL.match(tail) or len(digits) + len(denominator or "") > _MAX_NUMBER_DIGITS:
        return None
    if "," in digits:
        if not _GROUPED.match(digits):
            return None
        digits = digits.replace(",", "")
    try:
        value = Fraction(Decimal(digits))
    except (InvalidOperation, ValueError):
        return None
    if denominator is not None:
        if "." in digits or int(denominator) == 0:
            return None
        value /= int(denominator)
    return -value if sign == "-" else value


def _normalized_text(answer: str) -> str:
    text = _strip_latex(answer).replace("$", "")
    text = text.strip().strip(".").strip()
    return " ".join(text.lower().split())


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UsageError(f"unknown grading kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def _resolve(kind: str, ground_truth: str) -> str:
    if kind == "auto" and _CHOICE_GROUND_TRUTH.match(ground_truth):
        return "choice"
    return kind


def grade(response_text: str | None, ground_truth: str | None, kind: str = "auto") -> bool:
    """Whether the answer stated in ``response_text`` is equivalent to ``ground_truth``.

    ``ground_truth`` is the bare answer (``"18"``, ``"\\frac{1}{2}"``, ``"B"``);
    a missing ground truth or response grades ``False``.
    """
    kind = _check_kind(kind)
    if ground_truth is not None and not isinstance(ground_truth, str):
        ground_truth = str(ground_truth)  # numbers from JSON or parquet columns
    if not ground_truth or not ground_truth.strip() or not response_text:
        return False
    kind = _resolve(kind, ground_truth)
    if kind == "choice":
        expected = _extract_choice(ground_truth)
        return expected is not None and _extract_choice(response_text) == expected
    predicted = extract_answer(response_text, kind)
    if kind == "exact":
        candidates = {_normalized_text(response_text)}
        if predicted is not None:
            candidates.add(_normalized_text(predicted))
        return _normalized_text(ground_truth) in candidates
    if predicted is None:
        return False
    return equivalent(predicted, ground_truth, kind)


def equivalent(predicted: str, ground_truth: str, kind: str = "auto") -> bool:
    """Whether two bare answers are equal as numbers, as text, or (math/auto) symbolically."""
    expected_number = _as_number(ground_truth)
    predicted_number = _as_number(predicted)
    if expected_number is not None and predicted_number is not None:
        if expected_number == predicted_number:
            return True
        if kind in _NUMERIC_KINDS:
            return False
    if _normalized_text(predicted) == _normalized_text(ground_truth):
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


# --- voting -------------------------------------------------------------------


def _vote_key(answer: str, kind: str) -> str:
    if kind == "choice":
        return answer
    number = _as_number(answer)
    if number is not None:
        return f"number:{number}"
    return f"text:{_normalized_text(answer)}"


def majority_vote(texts: Sequence[str | None], kind: str = "auto") -> tuple[str | None, int]:
    """The most common extracted answer among ``texts`` and how many gave it.

    Answers are grouped when equal as numbers (``"1,000"`` and ``"1000.0"``)
    or as normalized text; ties go to the answer seen first. Texts without an
    answer do not vote; ``(None, 0)`` when none has one. ``auto`` votes treat
    answers as numbers or text (``choice`` must be asked for explicitly).
    """
    kind = _check_kind(kind)
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for text in texts:
        answer = extract_answer(text, kind)
        if answer is None:
            continue
        key = _vote_key(answer, kind)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, answer)
    if not counts:
        return None, 0
    best = max(counts, key=lambda key: counts[key])  # max keeps the first of equals: dicts keep order
    return first[best], counts[best]
