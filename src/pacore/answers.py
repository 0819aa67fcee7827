"""Answer extraction: the final answer a text states, and answers grouped for a vote.

Neutral ground for the engine (adaptive width votes on round-1 answers), the
server and the evaluation tools (:mod:`pacore.eval.grading` grades with
these). Pure text processing: no math-verify, no I/O, linear in the text, and
never raises on model output.

Answer kinds:

- ``number`` (alias ``gsm8k``): the answers are numbers; ``"1,000"``,
  ``"$18.00"``, ``"18 dollars"`` and ``"18"`` are all 18;
- ``math``: a stated mathematical answer (grading compares it symbolically);
- ``choice``: a multiple-choice letter A-E (``"(B)"``, ``"B)"``, ``"the answer is b"``);
- ``exact``: the text, compared after normalizing case, whitespace and wrappers;
- ``auto``: numbers or text (grading picks ``choice`` when the ground truth is a letter).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Literal, get_args

from pacore.errors import UsageError

GradingKind = Literal["auto", "math", "number", "gsm8k", "choice", "exact"]
KINDS: tuple[str, ...] = get_args(GradingKind)
NUMERIC_KINDS = ("number", "gsm8k")

_BOX_OPENING = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_PHRASE = re.compile(r"answer\s*\**\s*(?:is\s*:?|:|=)\s*\**[ \t]*([^\n]+)", re.IGNORECASE)
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


def extract_choice(text: str) -> str | None:
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
    kind = check_kind(kind)
    if not text or not text.strip():
        return None
    if kind == "choice":
        return extract_choice(text)
    stated = boxed_answer(text)
    if stated is None:
        for pattern in (_HASHES, _ANSWER_PHRASE):
            matches = pattern.findall(text)
            if matches:
                stated = _clean(_SENTENCE_END.split(matches[-1], maxsplit=1)[0])
                break
    if kind in NUMERIC_KINDS:
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
    value = as_number(stated)
    if value is None:
        last = _last_number(stated)
        value = as_number(last) if last is not None else None
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


def as_number(answer: str) -> Fraction | None:
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


def normalized_text(answer: str) -> str:
    text = _strip_latex(answer).replace("$", "")
    text = text.strip().strip(".").strip()
    return " ".join(text.lower().split())


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UsageError(f"unknown grading kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def answer_key(answer: str, kind: str) -> str:
    """What two answers share when they are the same vote (equal numbers, or equal normalized text)."""
    if kind == "choice":
        return answer
    number = as_number(answer)
    if number is not None:
        return f"number:{number}"
    return f"text:{normalized_text(answer)}"


def tally(texts: Sequence[str | None], kind: str = "auto") -> list[tuple[str, int]]:
    """The distinct answers stated in ``texts`` and how many gave each, in order of first appearance.

    Answers are grouped when equal as numbers (``"1,000"`` and ``"1000.0"``)
    or as normalized text, and spelled as first seen. Texts without an answer
    do not count.
    """
    kind = check_kind(kind)
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for text in texts:
        answer = extract_answer(text, kind)
        if answer is None:
            continue
        key = answer_key(answer, kind)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, answer)
    return [(first[key], count) for key, count in counts.items()]


def majority_vote(texts: Sequence[str | None], kind: str = "auto") -> tuple[str | None, int]:
    """The most common extracted answer among ``texts`` and how many gave it.

    Grouped as :func:`tally` groups them; ties go to the answer seen first.
    ``(None, 0)`` when no text states an answer. ``auto`` votes treat
    answers as numbers or text (``choice`` must be asked for explicitly).
    """
    counts = tally(texts, kind)
    if not counts:
        return None, 0
    return max(counts, key=lambda item: item[1])  # max keeps the first of equals
