"""Synthetic large-integer arithmetic problems with exact answers (the report's idea).

Operands of 11 to 13 digits make careful step-by-step computation necessary,
and Python's big integers give the exact answer. Operations are taken in turn
(``add, sub, mul, modexp, add, ...``) so every operation gets an equal share.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pacore.errors import UsageError
from pacore.files import atomic_output, refuse_overwriting

if TYPE_CHECKING:
    from pacore.eval.datasets import Problem

_INSTRUCTION = "Give the exact integer as your final answer in \\boxed{}."


def _add(a: int, b: int, m: int) -> tuple[str, int]:
    return f"Compute {a} + {b}.", a + b


def _sub(a: int, b: int, m: int) -> tuple[str, int]:
    return f"Compute {a} - {b}.", a - b


def _mul(a: int, b: int, m: int) -> tuple[str, int]:
    return f"Compute {a} × {b}.", a * b


def _modexp(a: int, b: int, m: int) -> tuple[str, int]:
    return f"Compute {a}^{b} mod {m}, the remainder of {a} to the power {b} divided by {m}.", pow(a, b, m)


_OPERATIONS: dict[str, Callable[[int, int, int], tuple[str, int]]] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "modexp": _modexp,
}
OPERATIONS = tuple(_OPERATIONS)
# Bounds that keep generation to seconds and memory small.
MAX_COUNT = 100_000
MAX_DIGITS = 100


def _clip(number: int) -> str:
    # str() of a huge integer is slow, and refused past 4300 digits.
    return str(number) if abs(number) < 10**30 else f"a number of about {int(number.bit_length() * 0.30103)} digits"


def synthetic_problems(
    count: int,
    *,
    digits: tuple[int, int] = (11, 13),
    operations: Sequence[str] = OPERATIONS,
    seed: int = 0,
) -> list[Problem]:
    """``count`` reproducible problems; operands have ``digits[0]..digits[1]`` digits.

    The same arguments always give the same problems. Ids are
    ``synth-<seed>-<index>``; answers are exact integers graded as numbers.
    """
    # Imported here: `pacore --help` lists OPERATIONS without loading the data set code.
    from pacore.eval.datasets import Problem

    if not 1 <= count <= MAX_COUNT:
        raise UsageError(f"count must be from 1 to {MAX_COUNT:,}, got {_clip(count)}")
    low, high = digits
    if not 1 <= low <= high <= MAX_DIGITS:
        raise UsageError(
            f"digits must be a range like 11-13 with 1 <= low <= high <= {MAX_DIGITS}, got {_clip(low)}-{_clip(high)}"
        )
    unknown = [op for op in operations if op not in _OPERATIONS]
    if unknown or not operations:
        raise UsageError(f"unknown operations {unknown or '(none given)'}; choose from {', '.join(OPERATIONS)}")
    rng = random.Random(f"pacore-synthetic:{seed}")

    def operand() -> int:
        width = rng.randint(low, high)
        return rng.randint(10 ** (width - 1), 10**width - 1)

    problems = []
    for index in range(count):
        operation = operations[index % len(operations)]
        a, b, modulus = operand(), operand(), operand()
        if operation == "sub" and a < b:
            a, b = b, a
        modulus = max(modulus, 2)
        question, answer = _OPERATIONS[operation](a, b, modulus)
        operands = [a, b, modulus] if operation == "modexp" else [a, b]
        problems.append(
            Problem(
                id=f"synth-{seed}-{index}",
                messages=[{"role": "user", "content": f"{question} {_INSTRUCTION}"}],
                answer=str(answer),
                kind="number",
                metadata={"operation": operation, "operands": operands},
            )
        )
    return problems


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> int:
    """Write problems as JSONL that :func:`pacore.eval.load_dataset` reads back.

    A single-message problem is written in the plain format (``id``,
    ``prompt``, ``answer``, ``kind``, ``metadata``), a conversation in the
    reference format (``messages``, ``ground_truth``). Returns the count.
    The file is replaced atomically; a run directory's own files are refused.
    """
    from pacore.store import store_files

    path = Path(path)
    refuse_overwriting(path, store_files(path.parent))
    count = 0
    with atomic_output(path) as out:
        for problem in problems:
            record: dict[str, object] = {"id": problem.id}
            if len(problem.messages) == 1 and isinstance(problem.messages[0].get("content"), str):
                record.update(prompt=problem.text, answer=problem.answer)
            else:
                record.update(messages=problem.messages, ground_truth={"answer": problem.answer})
            record.update(kind=problem.kind, metadata=problem.metadata)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
