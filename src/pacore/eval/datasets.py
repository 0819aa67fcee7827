"""Data set files: JSONL (or a JSON list) of problems, the format detected per record.

Recognised record shapes (first match wins):

- PaCoRe reference release: ``messages`` (chat), optional ``id``,
  ``ground_truth.answer`` and ``category``; the released training layout
  (``conversation``, ``ground_truth``, ``responses``) is read the same way;
- GSM8K: ``question`` and ``answer`` ending in ``#### N`` (the answer is N,
  graded as a number);
- MATH / AIME style: ``problem`` with ``answer`` (or a ``solution`` whose last
  ``\\boxed{}`` is the answer), optional ``id`` / ``unique_id``;
- plain: ``prompt`` and optional ``answer``.

Any record may carry ``kind`` (a grading kind, see :mod:`pacore.eval.grading`)
and ``metadata``; other fields are kept in :attr:`Problem.metadata`. Ids come
from ``id`` / ``unique_id``, else ``<file stem>-<line>``, and must be unique.

Selection: the seeded shuffle first, then ``offset``, then ``limit``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pacore.backends.base import Message
from pacore.engine import last_user_text, normalize_messages
from pacore.errors import DatasetError, InputError, UsageError
from pacore.eval.grading import KINDS, boxed_answer
from pacore.files import MIB, read_input

_SHAPES = (
    "'messages' (chat) with optional 'ground_truth', 'question' + 'answer' (GSM8K), "
    "'problem' + 'answer' or 'solution' (MATH), or 'prompt' with optional 'answer'"
)
_ROLES = ("system", "developer", "user", "assistant", "tool")
#: Larger data set files are refused before they are read (they are held in memory whole).
MAX_DATASET_BYTES = 512 * MIB


class Problem(BaseModel):
    """One evaluation problem (a pydantic model: ``model_dump_json`` round-trips)."""

    model_config = ConfigDict(frozen=True)

    id: str
    messages: list[Message]
    #: The verifiable answer; ``None`` when the data set gives none (not graded).
    answer: str | None = None
    #: Grading kind for :func:`pacore.eval.grade` (see ``pacore.eval.grading.KINDS``).
    kind: str = "auto"
    #: 1-based line (JSONL) or item (JSON list) number in the source file; 0 if generated.
    line: int = 0
    #: Everything else the record carried (category, solution, cached responses...).
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def text(self) -> str:
        """The text of the last user message (the problem statement)."""
        return last_user_text(self.messages)


class _RecordError(Exception):
    """A record is unusable; the loader adds the file and line."""


def load_dataset(
    path: str | Path,
    *,
    limit: int | None = None,
    offset: int = 0,
    shuffle: bool = False,
    seed: int = 0,
) -> list[Problem]:
    """Read a data set file and select problems from it.

    ``.json`` files hold a list of records; anything else is JSONL (one
    record per line, blank lines ignored). With ``shuffle`` the problems are
    shuffled with ``seed`` first; then the first ``offset`` are skipped and at
    most ``limit`` are kept.

    Raises :class:`DatasetError` naming the file and line for a missing or
    empty file, invalid JSON, an unknown record shape or a duplicate id.
    """
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1, got {limit}")
    if offset < 0:
        raise UsageError(f"offset must be 0 or more, got {offset}")
    file = Path(path)
    problems = _read(file)
    if shuffle:
        random.Random(seed).shuffle(problems)
    if offset >= len(problems):
        raise DatasetError(f"{file}: offset {offset} is past the end ({len(problems)} problems)")
    end = None if limit is None else offset + limit
    return problems[offset:end]


def _read(file: Path) -> list[Problem]:
    raw = read_input(file, limit=MAX_DATASET_BYTES, what="data set file", error=DatasetError)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{file.name}:{line}: not valid UTF-8 text") from None
    records = _json_records(file, text) if file.suffix.lower() == ".json" else _jsonl_records(file, text)
    if not records:
        raise DatasetError(f"{file}: the file holds no problems")
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for where, number, record in records:
        try:
            problem = _problem(record, f"{file.stem}-{number}", number)
        except _RecordError as exc:
            raise DatasetError(f"{where}: {exc}") from None
        if problem.id in seen:
            raise DatasetError(f"{where}: duplicate id {problem.id!r} (first at {seen[problem.id]})")
        seen[problem.id] = where
        problems.append(problem)
    return problems


def _jsonl_records(file: Path, text: str) -> list[tuple[str, int, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file.name}:{number}"
        try:
            records.append((where, number, json.loads(line)))
        except (ValueError, RecursionError) as exc:  # ValueError: also ints too long to convert
            raise DatasetError(f"{where}: invalid JSON: {_json_reason(exc)}") from None
    return records


def _json_reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (column {exc.colno})"
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _json_records(file: Path, text: str) -> list[tuple[str, int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{file.name}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:
        raise DatasetError(f"{file.name}: invalid JSON: {_json_reason(exc)}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{file.name}: a .json data set must hold a list of records")
    return [(f"{file.name}: item {i}", i, record) for i, record in enumerate(data, start=1)]


def _problem(record: Any, default_id: str, number: int) -> Problem:
    if not isinstance(record, dict):
        raise _RecordError(f"expected a JSON object, got {type(record).__name__}")
    fields = dict(record)
    kind = _kind(fields.pop("kind", None))
    metadata = _metadata(fields.pop("metadata", None))
    problem_id = _id(fields.pop("id", None), fields.pop("unique_id", None), default_id)
    if "messages" in fields or "conversation" in fields:
        key = "messages" if "messages" in fields else "conversation"
        messages = _messages(fields.pop(key), key)
        answer = _ground_truth(fields.pop("ground_truth", None))
    elif "question" in fields:
        messages = _user(fields.pop("question"), "question")
        answer = _answer(fields.pop("answer", None))
        if answer is not None and "####" in answer:
            metadata["solution"] = answer
            answer = answer.rsplit("####", 1)[1].strip().replace(",", "") or None
            kind = kind or "gsm8k"
    elif "problem" in fields:
        messages = _user(fields.pop("problem"), "problem")
        answer = _answer(fields.pop("answer", None))
        if answer is None and isinstance(fields.get("solution"), str):
            answer = boxed_answer(fields["solution"])
        kind = kind or "math"
    elif "prompt" in fields:
        messages = _user(fields.pop("prompt"), "prompt")
        answer = _answer(fields.pop("answer", None))
    else:
        # repr() for keys with control characters: the error stays on one line.
        keys = ", ".join(sorted(key if key.isprintable() else repr(key) for key in map(str, record))) or "none"
        raise _RecordError(f"unknown record shape (keys: {keys}); expected {_SHAPES}")
    metadata.update(fields)
    return Problem(id=problem_id, messages=messages, answer=answer, kind=kind or "auto", line=number, metadata=metadata)


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if value not in KINDS:
        raise _RecordError(f"unknown grading kind {value!r}; expected one of {', '.join(KINDS)}")
    return value


def _metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _RecordError("'metadata' must be a JSON object")
    return dict(value)


def _id(value: Any, unique_id: Any, default: str) -> str:
    chosen = value if value is not None else unique_id
    if chosen is None:
        return default
    if isinstance(chosen, bool) or not isinstance(chosen, (str, int)):
        raise _RecordError(f"the id must be text or a whole number, got {json.dumps(chosen)[:40]}")
    text = str(chosen).strip()
    if not text:
        raise _RecordError("the id is empty")
    return text


def _user(value: Any, key: str) -> list[Message]:
    if not isinstance(value, str) or not value.strip():
        raise _RecordError(f"'{key}' must be non-empty text")
    return [{"role": "user", "content": value}]


def _messages(value: Any, key: str) -> list[Message]:
    if not isinstance(value, list):
        raise _RecordError(f"'{key}' must be a list of chat messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise _RecordError(f"'{key}' item {i} is not a chat message with a role ({', '.join(_ROLES)})")
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise _RecordError(f"'{key}' item {i} has a content part without a type")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise _RecordError(f"'{key}' item {i} has a text part without text")
    try:
        return normalize_messages(value)
    except InputError as exc:
        raise _RecordError(f"'{key}': {exc}") from None


def _answer(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _RecordError(f"the answer must be text or a number, got {json.dumps(value)[:40]}")
    text = str(value).strip()
    return text or None


def _ground_truth(value: Any) -> str | None:
    if isinstance(value, dict):
        return _answer(value.get("answer"))
    return _answer(value)


def dataset_fingerprint(problems: Sequence[Problem]) -> str:
    """A stable hex digest of the problems' ids, messages and answers.

    Independent of their order (a shuffled selection of the same problems
    has the same fingerprint) and of metadata and grading kinds.
    """
    items = sorted(
        json.dumps([p.id, p.messages, p.answer], sort_keys=True, ensure_ascii=False, default=str) for p in problems
    )
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
