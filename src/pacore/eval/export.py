"""Training data for the synthesis step: the released PaCoRe-Train layout, verl and TRL.

The source is a run directory (its trajectory pool, or the first round of
one arm) or a file in the released PaCoRe-Train layout (its ``responses``
are the pool). For each problem a message set M is drawn: its size uniformly
from ``min_size..max_size`` (seeded per problem) and clipped to the messages
that exist, so a pool of 8 gives sets of 8. A problem is kept only when the
accuracy of its message set lies strictly between ``min_acc`` and
``max_acc`` (the report's stage 1 keeps 0 < acc < 9/24 for math: not
hopeless, and not already won by voting; ``min_acc=-1`` drops the lower
bound), and, for the report's stage 2, when its synthesis success rate in a
pacore run (``synthesis_acc``) lies strictly inside the given bounds.
Problems without a ground truth are skipped.

Formats (one record per kept problem):

- ``pacore`` (JSONL): ``{"id", "conversation", "responses", "ground_truth"}``;
- ``verl`` (parquet): ``data_source``, ``prompt`` (chat messages), ``ability``,
  ``reward_model`` (``style``, ``ground_truth``) and ``extra_info`` (``id``,
  ``index``, ``kind``, ``problem``, ``message_accuracy``, ``message_indices``);
- ``trl`` (parquet, or JSONL for a ``.jsonl`` file): ``prompt`` (chat
  messages), ``ground_truth``, ``kind``, plus ``id``, ``problem`` and
  ``message_accuracy``.

In ``verl`` and ``trl`` the prompt is the synthesis conversation exactly as
the engine sends it for that message set (same template, compaction and
reference order: :func:`pacore.synthesis.build_synthesis_input`).
``message_indices`` are the positions of the references, in prompt order,
in the pool (or first round, or ``responses`` list) they were drawn from.
Image parts cannot share a parquet column with text, so a message with
images is written in verl's multimodal convention: its text with an
``<image>`` placeholder per image, and an ``images`` column of
``{"image": url}`` items.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacore._extras import require
from pacore.backends.base import Message
from pacore.engine import adopt_first_round
from pacore.errors import RunConflictError, UsageError
from pacore.eval.choices import (
    DEFAULT_MAX_ACC,
    DEFAULT_MAX_SIZE,
    DEFAULT_MIN_ACC,
    DEFAULT_MIN_SIZE,
    FORMATS,
    ExportFormat,
)
from pacore.eval.datasets import load_dataset
from pacore.eval.grading import format_note_counts, grade_verdict
from pacore.eval.report import run_inputs
from pacore.files import atomic_output, refuse_overwriting
from pacore.messages import compact, last_user_text, text_of
from pacore.prompts import SynthesisTemplate
from pacore.schedule import Schedule
from pacore.store import ArmInfo, RunStore, StoredProblem
from pacore.synthesis import ReferenceOrder, build_synthesis_input
from pacore.trace import Trajectory

IMAGE_PLACEHOLDER = "<image>"

_ABILITY = {"choice": "choice", "exact": "text"}  # every other grading kind is "math"
_RANGE = re.compile(r"^\s*(-?[\d.]+)\s*\.\.\s*(-?[\d.]+)\s*$")


@dataclass
class ExportSummary:
    out: Path
    source: str
    problems: int
    kept: int = 0
    #: Why the other problems were dropped, with counts.
    dropped: Counter[str] = field(default_factory=Counter)
    #: Answers of the drawn message sets graded wrong without being compared, by grade note
    #: (see :class:`pacore.eval.grading.GradeVerdict`): the accuracy filter counted them wrong.
    not_judged: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        why = ", ".join(f"{count} {reason}" for reason, count in self.dropped.most_common())
        dropped = f"; dropped {sum(self.dropped.values())}: {why}" if self.dropped else ""
        notes = format_note_counts(self.not_judged.most_common(3))
        not_judged = (
            f"; {self.not_judged.total()} answers not judged (graded wrong): {notes}" if self.not_judged else ""
        )
        return (
            f"kept {self.kept} of {self.problems} problems -> {self.out} (responses from {self.source})"
            f"{dropped}{not_judged}"
        )


@dataclass(frozen=True)
class MessageSource:
    """Where the problems and their first-round trajectories come from."""

    description: str
    #: Data set name, for verl's ``data_source``.
    name: str
    problems: list[StoredProblem]
    trajectories_of: Callable[[str], list[Trajectory]]
    #: The synthesis settings a run was made with (``None`` for a data file).
    template: dict[str, Any] | None = None


def parse_range(text: str, option: str = "--synthesis-acc") -> tuple[float, float]:
    """``"0.1..0.9"`` as ``(0.1, 0.9)``; a usage error unless ``MIN < MAX``."""
    match = _RANGE.match(text)
    if not match:
        raise UsageError(f"{option} takes MIN..MAX, e.g. 0..1, got {text!r}")
    try:
        low, high = float(match.group(1)), float(match.group(2))
    except ValueError:
        raise UsageError(f"{option} takes MIN..MAX, e.g. 0..1, got {text!r}") from None
    if not low < high:
        raise UsageError(f"{option} needs MIN < MAX, got {text!r}")
    return low, high


@contextmanager
def open_source(source: str | Path, arm: str | None) -> Iterator[MessageSource]:
    """A run directory, or a data file in the PaCoRe-Train layout (``responses`` as the pool)."""
    path = Path(source)
    if path.is_file():
        if arm is not None:
            raise UsageError("--arm applies to a run directory, not to a data file")
        yield _file_source(path)
        return
    with RunStore.open(path) as store:
        yield _run_source(store, arm)


def _file_source(path: Path) -> MessageSource:
    problems = load_dataset(path)
    stored = [StoredProblem(p.id, i, p.messages, p.answer, p.kind) for i, p in enumerate(problems)]
    responses = {p.id: p.metadata.get("responses") for p in problems}

    def trajectories_of(problem_id: str) -> list[Trajectory]:
        items = responses[problem_id]
        if not isinstance(items, list):
            return []
        texts = [text_of(r.get("content")) if isinstance(r, dict) else text_of(r) for r in items]
        return [Trajectory(round=0, index=i, text=text, message=compact(text)) for i, text in enumerate(texts)]

    return MessageSource(f"the responses of {path.name}", path.stem, stored, trajectories_of)


def _run_source(store: RunStore, arm: str | None) -> MessageSource:
    info = store.run_info()
    assert info is not None
    name = Path(info.dataset_path).stem
    problems = store.problems()
    settings = info.config.get("template")
    if info.pool_size and arm is None:

        def pooled(problem_id: str) -> list[Trajectory]:
            return _adopted(store.pool(problem_id))

        return MessageSource("the trajectory pool", name, problems, pooled, settings)
    arms = {a.name: a for a in store.arms()}
    if arm is not None and arm not in arms:
        raise RunConflictError(f"{store.run_dir} has no arm {arm!r} (it has {', '.join(arms) or 'none'})")
    chosen = arms[arm] if arm is not None else _widest_arm(list(arms.values()))
    if chosen is None:
        raise RunConflictError(f"{store.run_dir} has no results to export yet")

    def first_round(problem_id: str) -> list[Trajectory]:
        result = store.result(chosen.name, problem_id)
        if result is None or result.status != "done" or result.trace is None or not result.trace.rounds:
            return []
        return _adopted(result.trace.rounds[0].trajectories)

    return MessageSource(f"the first round of arm {chosen.name}", name, problems, first_round, settings)


def _adopted(trajectories: list[Trajectory]) -> list[Trajectory]:
    """Compaction recomputed, as the engine does when it adopts a first round."""
    return [t.model_copy(update={"message": compact(t.text) if t.ok else None}) for t in trajectories]


def _widest_arm(arms: list[ArmInfo]) -> ArmInfo | None:
    """The arm with the most first-round trajectories per problem."""

    def width(arm: ArmInfo) -> int:
        if arm.method == "majority":
            return arm.samples or 1
        if arm.method == "pacore" and arm.schedule:
            return Schedule.parse(arm.schedule).rounds[0]
        return 1

    return max(arms, key=width, default=None)


def synthesis_success(run_dir: str | Path) -> dict[str, tuple[int, int]]:
    """``problem_id -> (correct, graded)`` over every graded answer of every pacore arm of a run.

    A run made with repeats, or with several pacore arms of one policy,
    counts each of them; the rate is the share of those answers that were right.
    """
    counts: dict[str, list[int]] = {}
    with RunStore.open(run_dir) as store:
        for arm in store.arms():
            if arm.method != "pacore":
                continue
            for result in store.results(arm.name, traces=False):
                if result.status == "done" and result.correct is not None:
                    tally = counts.setdefault(result.problem_id, [0, 0])
                    tally[0] += int(result.correct)
                    tally[1] += 1
    if not counts:
        raise RunConflictError(f"{run_dir} has no graded pacore answers to measure synthesis success on")
    return {problem_id: (right, graded) for problem_id, (right, graded) in counts.items()}


def export_train(
    source: str | Path,
    out: str | Path,
    *,
    format: ExportFormat = "pacore",
    min_acc: float = DEFAULT_MIN_ACC,
    max_acc: float = DEFAULT_MAX_ACC,
    min_size: int = DEFAULT_MIN_SIZE,
    max_size: int = DEFAULT_MAX_SIZE,
    seed: int = 0,
    arm: str | None = None,
    synthesis_acc: tuple[float, float] | None = None,
    synthesis_run: str | Path | None = None,
    template: SynthesisTemplate | str | Path | None = None,
    order: ReferenceOrder | None = None,
) -> ExportSummary:
    """Write the training records of ``source`` to ``out`` (replaced atomically).

    ``seed`` draws the message sets and, in ``verl`` / ``trl``, orders the
    references as the engine does for a request with that seed. The
    template and reference order default to those the run was made with
    (for a data file: the default template, ``shuffle``).
    ``synthesis_acc`` reads the synthesis success rates of ``synthesis_run``
    (default: ``source`` when it is a run directory).
    """
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    if not min_acc < max_acc:
        raise UsageError(f"need --min-acc < --max-acc, got {min_acc:g} and {max_acc:g}")
    if not 1 <= min_size <= max_size:
        raise UsageError(f"need 1 <= --min-size <= --max-size, got {min_size} and {max_size}")
    out = Path(out)
    if format == "verl" and out.suffix != ".parquet":
        raise UsageError(f"verl reads parquet: give --out a .parquet file, not {out.name}")
    refuse_overwriting(out, _inputs(source, synthesis_run))
    success = None
    if synthesis_acc is not None:
        if synthesis_run is None and not Path(source).is_dir():
            raise UsageError("--synthesis-acc needs --synthesis-run RUN_DIR (a pacore run of the stage-1 policy)")
        success = synthesis_success(synthesis_run if synthesis_run is not None else source)
    with open_source(source, arm) as messages:
        synthesis, order = _synthesis_settings(messages.template, template, order)
        summary = ExportSummary(out=out, source=messages.description, problems=len(messages.problems))
        rows: list[dict[str, Any]] = []
        for problem in messages.problems:
            drawn = _draw(
                problem, messages.trajectories_of(problem.id), min_acc, max_acc, min_size, max_size, seed,
                summary.not_judged,
            )  # fmt: skip
            if isinstance(drawn, str):
                summary.dropped[drawn] += 1
                continue
            why = _synthesis_filter(problem.id, success, synthesis_acc)
            if why is not None:
                summary.dropped[why] += 1
                continue
            chosen, accuracy = drawn
            rows.append(_row(format, problem, chosen, accuracy, messages.name, synthesis, order, seed))
        summary.kept = len(rows)
    _write(format, rows, out)
    return summary


def _inputs(source: str | Path, synthesis_run: str | Path | None) -> dict[Path, str]:
    """The files an export may never replace: each run's own files and data set, or the source file."""
    inputs: dict[Path, str] = {}
    for path in (Path(source), *([Path(synthesis_run)] if synthesis_run is not None else [])):
        if path.is_dir():
            with RunStore.open(path) as store:
                inputs |= run_inputs(store)
        else:
            inputs[path] = "the source data file"
    return inputs


def _synthesis_settings(
    run_settings: dict[str, Any] | None, template: SynthesisTemplate | str | Path | None, order: ReferenceOrder | None
) -> tuple[SynthesisTemplate, ReferenceOrder]:
    """The template and order the prompts are built with: as asked, else as the run was made."""
    run_settings = run_settings or {}
    if order is None:
        order = run_settings.get("reference_order", "shuffle")
    if template is not None or "sha256" not in run_settings:
        return SynthesisTemplate.load(template), order
    origin = run_settings.get("origin")
    try:
        chosen = SynthesisTemplate.load(origin)
    except UsageError:
        chosen = None
    if chosen is None or hashlib.sha256(chosen.source.encode("utf-8")).hexdigest() != run_settings["sha256"]:
        raise UsageError(
            f"the run was made with the synthesis template {origin!r}, which cannot be found unchanged; "
            "pass it with --template"
        )
    return chosen, order


def _draw(
    problem: StoredProblem,
    trajectories: list[Trajectory],
    min_acc: float,
    max_acc: float,
    min_size: int,
    max_size: int,
    seed: int,
    not_judged: Counter[str],
) -> tuple[list[Trajectory], float] | str:
    """The drawn message set and its accuracy, or why the problem is dropped; the notes of
    its answers graded wrong without being compared are added to ``not_judged``."""
    if problem.ground_truth is None:
        return "without ground truth"
    usable = [t for t in trajectories if t.message]
    if not usable:
        return "without responses"
    rng = random.Random(f"pacore-export:{seed}:{problem.id}")
    size = rng.randint(min(min_size, len(usable)), min(max_size, len(usable)))
    chosen = rng.sample(usable, size)
    verdicts = [grade_verdict(t.message, problem.ground_truth, problem.kind) for t in chosen]
    not_judged.update(v.note for v in verdicts if v.note is not None)
    accuracy = sum(v.correct for v in verdicts) / size
    if accuracy <= min_acc:
        return f"with message accuracy <= {min_acc:g}"
    if accuracy >= max_acc:
        return f"with message accuracy >= {max_acc:g}"
    return chosen, accuracy


def _synthesis_filter(
    problem_id: str, success: dict[str, tuple[int, int]] | None, bounds: tuple[float, float] | None
) -> str | None:
    if success is None or bounds is None:
        return None
    if problem_id not in success:
        return "without a synthesis success rate"
    right, graded = success[problem_id]
    rate = right / graded
    if rate <= bounds[0]:
        return f"with synthesis success <= {bounds[0]:g}"
    if rate >= bounds[1]:
        return f"with synthesis success >= {bounds[1]:g}"
    return None


def _row(
    format: ExportFormat,
    problem: StoredProblem,
    chosen: list[Trajectory],
    accuracy: float,
    source_name: str,
    template: SynthesisTemplate,
    order: ReferenceOrder,
    seed: int,
) -> dict[str, Any]:
    assert problem.ground_truth is not None  # _draw drops the others
    if format == "pacore":
        return {
            "id": problem.id,
            "conversation": problem.messages,
            "responses": [t.message for t in chosen],
            "ground_truth": problem.ground_truth,
        }
    # The message set as the engine adopts a first round, so the order rule sees what it would see.
    first_round = adopt_first_round(chosen)
    built = build_synthesis_input(problem.messages, first_round, template=template, order=order, seed=seed)
    prompt, images = _parquet_messages(built.conversation)
    indices = [chosen[index].index for _, index in built.references]
    problem_text = last_user_text(problem.messages)
    if format == "verl":
        row: dict[str, Any] = {
            "data_source": f"pacore/{source_name}",
            "prompt": prompt,
            "ability": _ABILITY.get(problem.kind, "math"),
            "reward_model": {"style": "rule", "ground_truth": problem.ground_truth},
            "extra_info": {
                "id": problem.id,
                "index": problem.position,
                "split": "train",
                "kind": problem.kind,
                "problem": problem_text,
                "message_accuracy": accuracy,
                "message_indices": indices,
            },
        }
    else:
        row = {
            "id": problem.id,
            "prompt": prompt,
            "ground_truth": problem.ground_truth,
            "kind": problem.kind,
            "problem": problem_text,
            "message_accuracy": accuracy,
        }
    if images:
        row["images"] = images
    return row


def _parquet_messages(conversation: Sequence[Message]) -> tuple[list[Message], list[dict[str, Any]]]:
    """Messages whose content is text, and the images taken out of them (verl's ``<image>`` convention)."""
    images: list[dict[str, Any]] = []
    messages: list[Message] = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            pieces = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    pieces.append(part.get("text", ""))
                elif isinstance(part, dict) and part.get("type") == "image_url":
                    url = part.get("image_url")
                    images.append({"image": url.get("url") if isinstance(url, dict) else url})
                    pieces.append(IMAGE_PLACEHOLDER)
            message = {**message, "content": "".join(pieces)}
        messages.append(message)
    return messages, images


def _write(format: ExportFormat, rows: list[dict[str, Any]], out: Path) -> None:
    """JSONL for ``pacore`` (and ``trl`` to a ``.jsonl`` file), parquet otherwise; atomic either way."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "pacore" or out.suffix in (".jsonl", ".json"):
        with atomic_output(out) as file:
            for row in rows:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        _write_parquet(rows, out)


def _write_parquet(rows: list[dict[str, Any]], out: Path) -> None:
    require("export", "pyarrow.parquet", feature="writing parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    with atomic_output(out, "wb") as file:
        pq.write_table(table, file)
