"""The data set catalogue: public sources of common benchmarks, converted to pacore's shapes.

Each entry, a table of ``catalogue.toml`` beside this file, names its public
file(s) (Hugging Face ``resolve/main`` or GitHub raw URLs), their format and a
converter (:data:`CONVERTERS`) from the published columns to a record
:func:`pacore.eval.load_dataset` reads. :func:`get_dataset` downloads
(through the verified cache of :mod:`pacore.eval.download`), converts,
checks the result with the loader and writes it atomically.

``PACORE_DATA_MIRROR`` replaces the host of every catalogue URL (the path is
kept), e.g. ``https://hf-mirror.com``; a mirror's file must have the same
sha256 as the public one.

Which schemas were checked: ``verified`` on each entry says what was checked
against the published dataset card or file listing when the entry was
written (no file could be downloaded then); the converters fail with a
one-line error naming the missing column if a source changes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter

from pacore._extras import require
from pacore.errors import DatasetError, DownloadError, UsageError
from pacore.eval.download import (
    DownloadBar,
    DownloadLimits,
    Fetched,
    Manifest,
    data_cache_dir,
    fetch,
    file_sha256,
    format_size,
    normalize_sha256,
)
from pacore.files import atomic_output, refuse_overwriting

Format = Literal["jsonl", "json", "parquet", "csv"]
Row = dict[str, Any]
#: ``(row, 1-based row number, file tag) -> pacore record``.
Converter = Callable[[Row, int, str], Row]

MIRROR_ENV = "PACORE_DATA_MIRROR"
_MB = 1_000_000


@dataclass(frozen=True)
class SourceFile:
    """One public file: ``host`` + ``/`` + ``path``."""

    host: str
    path: str
    format: Format
    #: Known sha256; ``None``: recorded on first download (trust on first use).
    sha256: str | None = None
    #: Added to each record's metadata and id (e.g. ``stage1``); empty for none.
    tag: str = ""

    @property
    def url(self) -> str:
        return f"{self.host}/{self.path}"

    def url_via(self, mirror: str | None) -> str:
        return f"{mirror.rstrip('/')}/{self.path}" if mirror else self.url


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    description: str
    #: The dataset's page (for people).
    page: str
    files: tuple[SourceFile, ...]
    convert: Converter
    licence: str
    #: What was checked against the published card or listing.
    verified: str
    #: Expected number of problems (``data list`` shows it; not enforced); ``None``: not published.
    problems: int | None = None
    max_bytes: int = 200 * _MB
    note: str = ""
    kinds: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------
# Converters: published columns -> pacore records


def _column(row: Row, name: str, number: int, dataset: str) -> Any:
    if name not in row or row[name] is None:
        columns = ", ".join(sorted(map(str, row))) or "none"
        raise DatasetError(f"{dataset}: row {number} has no '{name}' column (columns: {columns})")
    return row[name]


def _text(row: Row, name: str, number: int, dataset: str) -> str:
    value = _column(row, name, number, dataset)
    return str(value).strip()


def _gsm8k(row: Row, number: int, tag: str) -> Row:
    # The native shape: the loader takes the number after '####' and grades it as GSM8K.
    return {
        "id": f"gsm8k-test-{number}",
        "question": _text(row, "question", number, "gsm8k"),
        "answer": _text(row, "answer", number, "gsm8k"),
    }


def _math500(row: Row, number: int, tag: str) -> Row:
    return {
        "id": _text(row, "unique_id", number, "math500"),
        "problem": _text(row, "problem", number, "math500"),
        "answer": _text(row, "answer", number, "math500"),
        "kind": "math",
        "metadata": {key: row[key] for key in ("subject", "level", "solution") if key in row},
    }


def _aime2024(row: Row, number: int, tag: str) -> Row:
    return {
        "id": f"aime2024-{_text(row, 'id', number, 'aime2024')}",
        "problem": _text(row, "problem", number, "aime2024"),
        "answer": _text(row, "answer", number, "aime2024"),
        "kind": "math",
        "metadata": {key: row[key] for key in ("url", "year", "solution") if key in row},
    }


def _matharena(prefix: str) -> Converter:
    """MathArena competitions: ``problem_idx``, ``problem``, ``answer``, ``problem_type``."""

    def convert(row: Row, number: int, tag: str) -> Row:
        return {
            "id": f"{prefix}-{_text(row, 'problem_idx', number, prefix)}",
            "problem": _text(row, "problem", number, prefix),
            "answer": _text(row, "answer", number, prefix),
            "kind": "math",
            "metadata": {key: row[key] for key in ("problem_type",) if key in row},
        }

    return convert


GPQA_LETTERS = "ABCD"
GPQA_PROMPT = (
    "Answer the following multiple choice question. The last line of your response should be of the "
    "form 'Answer: LETTER' (without quotes), where LETTER is one of ABCD. Think step by step before "
    "answering.\n\n{question}\n\n{options}"
)


def gpqa_option_order(question_id: str) -> list[int]:
    """A fixed permutation of the four options (0 = the correct one) for one question id.

    Derived from sha256, so it is the same on every machine and Python version.
    """
    return sorted(range(4), key=lambda i: hashlib.sha256(f"{question_id}:{i}".encode()).hexdigest())


def _gpqa(row: Row, number: int, tag: str) -> Row:
    name = "gpqa-diamond"
    question = _text(row, "Question", number, name)
    options = [_text(row, "Correct Answer", number, name)] + [
        _text(row, f"Incorrect Answer {i}", number, name) for i in (1, 2, 3)
    ]
    record_id = str(row.get("Record ID") or "").strip() or hashlib.sha256(question.encode()).hexdigest()[:16]
    order = gpqa_option_order(record_id)
    lines = "\n".join(f"{letter}) {options[i]}" for letter, i in zip(GPQA_LETTERS, order, strict=True))
    metadata = {key: row[key] for key in ("High-level domain", "Subdomain") if row.get(key)}
    return {
        "id": f"gpqa-{record_id}",
        "prompt": GPQA_PROMPT.format(question=question, options=lines),
        "answer": GPQA_LETTERS[order.index(0)],
        "kind": "choice",
        "metadata": metadata,
    }


def _pacore_train(row: Row, number: int, tag: str) -> Row:
    # Keep the released layout (conversation, responses, ground_truth) so training tools read it as is.
    _column(row, "conversation", number, "pacore-train")
    _column(row, "ground_truth", number, "pacore-train")
    record = dict(row)
    own_id = record.get("id")
    # Prefixed with the stage, so that ids stay unique when both stages are joined.
    record["id"] = f"pacore-train-{tag + '-' if tag else ''}{number if own_id is None else own_id}"
    if tag:
        metadata = record.get("metadata")
        if not isinstance(metadata, dict):
            metadata = {}
        record["metadata"] = {**metadata, "stage": tag}
    return record


# ---------------------------------------------------------------------------
# The catalogue

#: Published columns -> pacore records, by the name a catalogue entry's ``converter`` gives.
CONVERTERS: dict[str, Converter] = {
    "gsm8k": _gsm8k,
    "math500": _math500,
    "aime2024": _aime2024,
    "aime2025": _matharena("aime2025"),
    "hmmt2025": _matharena("hmmt2025"),
    "gpqa-diamond": _gpqa,
    "pacore-train": _pacore_train,
}


def catalogue_of(tables: dict[str, dict[str, Any]]) -> dict[str, CatalogueEntry]:
    """The entries of parsed ``catalogue.toml`` tables, each field checked (a pydantic error names a wrong one)."""
    check = TypeAdapter(CatalogueEntry).validate_python
    entries = {}
    for name, table in tables.items():
        fields = dict(table)
        converter = fields.pop("converter", None)
        if converter not in CONVERTERS:
            raise ValueError(f"data set {name!r}: converter {converter!r} is not one of {', '.join(CONVERTERS)}")
        convert = CONVERTERS[converter]
        entries[name] = check({"name": name, "convert": convert, **fields})
    for entry in entries.values():
        _check_parts(entry, entries)
    return entries


def _check_parts(whole: CatalogueEntry, entries: dict[str, CatalogueEntry]) -> None:
    """Refuse a data set of several files whose figure is not the sum of the entries that hold one file each."""
    if len(whole.files) < 2 or whole.problems is None:
        return
    single = {entry.files[0]: entry for entry in entries.values() if len(entry.files) == 1}
    parts = [single[file] for file in whole.files if file in single]
    counts = [part.problems for part in parts if part.problems is not None]
    if len(counts) == len(whole.files) and sum(counts) != whole.problems:
        names = " + ".join(part.name for part in parts)
        raise ValueError(f"data set {whole.name!r}: {whole.problems} problems, but {names} hold {sum(counts)}")


#: The data sets, from ``catalogue.toml`` (data, not code: one table per data set).
CATALOGUE: dict[str, CatalogueEntry] = catalogue_of(
    tomllib.loads(files("pacore.eval").joinpath("catalogue.toml").read_text(encoding="utf-8"))
)


def catalogue_entry(name: str) -> CatalogueEntry:
    """The entry called ``name``; a :class:`UsageError` listing the names otherwise."""
    entry = CATALOGUE.get(name.strip().lower())
    if entry is None:
        raise UsageError(f"unknown data set {name!r}; known: {', '.join(CATALOGUE)} (see 'pacore data list')")
    return entry


# ---------------------------------------------------------------------------
# Reading source files


def detect_format(path: Path, declared: Format) -> Format:
    """The file's real format: parquet and JSON lists are recognised by content, CSV by name or catalogue."""
    with path.open("rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    if path.suffix.lower() == ".csv" or (declared == "csv" and path.suffix.lower() not in (".json", ".jsonl")):
        return "csv"
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[":
        return "json"
    if first == b"{":
        return "jsonl"
    return declared


def read_rows(path: Path, fmt: Format) -> list[Row]:
    """The rows of a source file as dicts; a :class:`DatasetError` naming the file if it is unreadable."""
    try:
        if fmt == "parquet":
            return _parquet_rows(path)
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{path.name}: not valid UTF-8 text") from None
    if fmt == "csv":
        try:
            return list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as exc:
            raise DatasetError(f"{path.name}: invalid CSV: {exc}") from None
    if fmt == "json":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise DatasetError(f"{path.name}: invalid JSON: {exc or 'nested too deeply'}") from None
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise DatasetError(f"{path.name}: expected a JSON list of objects")
        return data
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise DatasetError(f"{path.name}:{number}: invalid JSON: {exc}") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path.name}:{number}: expected a JSON object")
        rows.append(row)
    return rows


def _parquet_rows(path: Path) -> list[Row]:
    require("eval", "pyarrow.parquet", feature=f"reading the parquet file {path.name}")
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise DatasetError(f"{path.name}: unreadable parquet file: {' '.join(str(exc).split())}") from None


# ---------------------------------------------------------------------------
# Getting a data set


@dataclass(frozen=True)
class SourceReport:
    """Where one source file came from and how it was verified."""

    location: str
    sha256: str
    size: int
    downloaded: bool
    trust: str
    rows: int


@dataclass(frozen=True)
class GetReport:
    name: str
    out: Path
    problems: int
    sources: list[SourceReport]
    #: ``out`` already held exactly this data set: nothing was written.
    unchanged: bool = False


def cache_path_for(url: str, cache: Path) -> Path:
    """A cache file for ``url``: its host (and port) and path under ``cache`` (no '..', query hashed in)."""
    import httpx  # here: listing the catalogue needs no HTTP client

    parsed = httpx.URL(url)
    parts = [p for p in parsed.path.split("/") if p not in ("", ".", "..")] or ["index"]
    if parsed.query:
        parts[-1] += "-" + hashlib.sha256(parsed.query).hexdigest()[:12]
    host = parsed.host if parsed.port is None else f"{parsed.host}_{parsed.port}"
    return cache.joinpath(host, *parts)


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def get_dataset(
    name: str,
    *,
    out: Path,
    source: str | None = None,
    force: bool = False,
    sha256: str | None = None,
    max_bytes: int | None = None,
    progress: DownloadBar | None = None,
    cache: Path | None = None,
) -> GetReport:
    """Download (or read) data set ``name``, convert it and write pacore JSONL to ``out``.

    ``source`` is a local file or a URL to use instead of the public source
    (same conversion). ``sha256`` pins the checksum of the (single) source
    file. An existing ``out`` is replaced only with ``force`` (which also downloads
    again); one that already holds this very data set is left as it is.
    The output is checked with :func:`load_dataset` before it is moved into
    place, so a written file always loads. ``progress`` opens a progress
    display for each download (see :data:`pacore.eval.download.DownloadBar`).
    """
    entry = catalogue_entry(name)
    pinned = normalize_sha256(sha256) if sha256 else None
    if out.suffix.lower() == ".json":
        raise UsageError(f"{out}: pacore writes JSONL; use a .jsonl name")
    if out.is_dir():
        raise UsageError(f"{out} is a directory; give a file name for --out")
    if pinned and source is None and len(entry.files) > 1:
        raise UsageError(f"{entry.name} has {len(entry.files)} files; --sha256 needs --from with one of them")
    cache = cache or data_cache_dir()
    limits = DownloadLimits(max_bytes=max_bytes or entry.max_bytes)
    plan: list[tuple[str, str | None, SourceFile]]
    if source is not None:
        declared = entry.files[0]
        # The catalogue's checksum belongs to the public file, not to what --from names.
        tag = declared.tag if len(entry.files) == 1 else ""
        plan = [(source, None, SourceFile(declared.host, declared.path, declared.format, tag=tag))]
    else:
        mirror = os.environ.get(MIRROR_ENV) or None
        plan = [(f.url_via(mirror), f.url, f) for f in entry.files]
    records: list[Row] = []
    reports: list[SourceReport] = []
    from pacore.store import store_files

    inputs = store_files(out.parent)
    for location, canonical, spec in plan:
        fetched = _obtain(location, canonical, spec, pinned, force, limits, progress, cache)
        inputs[fetched.path] = f"the source file {location}"
        refuse_overwriting(out, inputs)
        rows = read_rows(fetched.path, detect_format(fetched.path, spec.format))
        if not rows:
            raise DatasetError(f"{location}: the file holds no rows")
        records.extend(entry.convert(row, number, spec.tag) for number, row in enumerate(rows, start=1))
        reports.append(
            SourceReport(location, fetched.sha256, fetched.size, fetched.downloaded, fetched.trust, len(rows))
        )
    content = "".join(json.dumps(record, ensure_ascii=False, default=str) + "\n" for record in records)
    if out.exists() and not force:
        # Getting the same data set twice is not a mistake; replacing another file silently would be.
        if _holds(out, content):
            return GetReport(entry.name, out, len(records), reports, unchanged=True)
        raise UsageError(f"{out} exists with other content; pass --force to overwrite it")
    _write_checked(content, out)
    return GetReport(entry.name, out, len(records), reports)


def _holds(path: Path, content: str) -> bool:
    """Whether ``path`` is a file holding exactly ``content``."""
    expected = content.encode("utf-8")
    try:
        return path.is_file() and path.stat().st_size == len(expected) and path.read_bytes() == expected
    except OSError:
        return False


def _obtain(
    location: str,
    canonical: str | None,
    spec: SourceFile,
    pinned: str | None,
    force: bool,
    limits: DownloadLimits,
    progress: DownloadBar | None,
    cache: Path,
) -> Fetched:
    if not _is_url(location):
        path = Path(location).expanduser()
        if not path.is_file():
            raise UsageError(f"--from {location}: no such file (give a file or an http(s) URL)")
        if path.stat().st_size > limits.max_bytes:  # the same bound as a download, checked before reading
            raise UsageError(
                f"--from {location}: {format_size(path.stat().st_size)} is more than the "
                f"{format_size(limits.max_bytes)} limit of this data set (raise it with --max-mb)"
            )
        digest = file_sha256(path)
        expected = pinned or spec.sha256
        if expected and digest != expected:
            raise DownloadError(f"checksum mismatch for {path}: got sha256 {digest}, expected {expected}")
        return Fetched(path, digest, path.stat().st_size, downloaded=False, trust="pinned" if expected else "local")
    key = canonical or location
    return fetch(
        location,
        cache_path_for(key, cache),
        manifest=Manifest(cache / "manifest.json"),
        manifest_key=key,
        sha256=pinned or spec.sha256,
        force=force,
        limits=limits,
        progress=progress,
    )


def _write_checked(content: str, out: Path) -> None:
    from pacore.eval.datasets import load_dataset

    def loads(temp: Path) -> None:
        try:
            load_dataset(temp)
        except DatasetError as exc:
            raise DatasetError(f"the converted data does not load, nothing written: {exc}") from None

    with atomic_output(out, check=loads) as handle:
        handle.write(content)
