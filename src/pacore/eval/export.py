"""Training data for the synthesis step, in the released PaCoRe-Train layout.

One JSONL record per kept problem::

    {"id": ..., "conversation": [chat messages], "responses": [M...], "ground_truth": "..."}

``responses`` is the message set M: compacted first-round responses drawn
from the run's trajectory pool (or, without a pool, from the first round of
one arm's traces). Its size is drawn uniformly from ``min_size..max_size``
(seeded per problem) and clipped to the messages that exist, so a pool of 8
gives sets of 8. A problem is kept only when the accuracy of its message set
lies strictly between ``min_acc`` and ``max_acc`` (the report keeps
0 < acc < 9/24 for math: not hopeless, and not already won by voting);
``min_acc=-1`` drops the lower bound. Problems without a ground truth are
skipped.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pacore.errors import RunConflictError, UsageError
from pacore.eval.grading import grade
from pacore.eval.report import run_inputs
from pacore.files import atomic_output, refuse_overwriting
from pacore.schedule import Schedule
from pacore.store import ArmInfo, RunStore, StoredProblem

DEFAULT_MIN_ACC = 0.0
DEFAULT_MAX_ACC = 0.375
DEFAULT_MIN_SIZE = 16
DEFAULT_MAX_SIZE = 24


@dataclass
class ExportSummary:
    out: Path
    source: str
    problems: int
    kept: int = 0
    #: Why the other problems were dropped, with counts.
    dropped: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        why = ", ".join(f"{count} {reason}" for reason, count in self.dropped.most_common())
        dropped = f"; dropped {sum(self.dropped.values())}: {why}" if self.dropped else ""
        return f"kept {self.kept} of {self.problems} problems -> {self.out} (responses from {self.source}){dropped}"


def _message_source(store: RunStore, arm: str | None) -> tuple[str, Callable[[str], list[str]]]:
    """Where the message sets come from, and the compacted first-round messages of a problem."""
    info = store.run_info()
    assert info is not None
    if info.pool_size and arm is None:
        return "the trajectory pool", lambda problem_id: [t.message for t in store.pool(problem_id) if t.message]
    arms = {a.name: a for a in store.arms()}
    if arm is not None and arm not in arms:
        raise RunConflictError(f"{store.run_dir} has no arm {arm!r} (it has {', '.join(arms) or 'none'})")
    chosen = arms[arm] if arm is not None else _widest_arm(list(arms.values()))
    if chosen is None:
        raise RunConflictError(f"{store.run_dir} has no results to export yet")

    def first_round(problem_id: str) -> list[str]:
        result = store.result(chosen.name, problem_id)
        if result is None or result.status != "done" or result.trace is None or not result.trace.rounds:
            return []
        return result.trace.rounds[0].messages

    return f"the first round of arm {chosen.name}", first_round


def _widest_arm(arms: list[ArmInfo]) -> ArmInfo | None:
    """The arm with the most first-round trajectories per problem."""

    def width(arm: ArmInfo) -> int:
        if arm.method == "majority":
            return arm.samples or 1
        if arm.method == "pacore" and arm.schedule:
            return Schedule.parse(arm.schedule).rounds[0]
        return 1

    return max(arms, key=width, default=None)


def export_train(
    run_dir: str | Path,
    out: str | Path,
    *,
    min_acc: float = DEFAULT_MIN_ACC,
    max_acc: float = DEFAULT_MAX_ACC,
    min_size: int = DEFAULT_MIN_SIZE,
    max_size: int = DEFAULT_MAX_SIZE,
    seed: int = 0,
    arm: str | None = None,
) -> ExportSummary:
    """Write the training records of ``run_dir`` to ``out`` (JSONL, replaced atomically)."""
    if not min_acc < max_acc:
        raise UsageError(f"need --min-acc < --max-acc, got {min_acc:g} and {max_acc:g}")
    if not 1 <= min_size <= max_size:
        raise UsageError(f"need 1 <= --min-size <= --max-size, got {min_size} and {max_size}")
    out = Path(out)
    with RunStore.open(run_dir) as store:
        refuse_overwriting(out, run_inputs(store))
        source, messages_of = _message_source(store, arm)
        problems = store.problems()
        summary = ExportSummary(out=out, source=source, problems=len(problems))
        with atomic_output(out) as file:
            for problem in problems:
                record = _record(problem, messages_of(problem.id), min_acc, max_acc, min_size, max_size, seed)
                if isinstance(record, str):
                    summary.dropped[record] += 1
                else:
                    summary.kept += 1
                    file.write(json.dumps(record, ensure_ascii=False) + "\n")
    return summary


def _record(
    problem: StoredProblem,
    messages: list[str],
    min_acc: float,
    max_acc: float,
    min_size: int,
    max_size: int,
    seed: int,
) -> dict[str, object] | str:
    """The record of a problem, or why it is dropped."""
    if problem.ground_truth is None:
        return "without ground truth"
    if not messages:
        return "without responses"
    rng = random.Random(f"pacore-export:{seed}:{problem.id}")
    size = rng.randint(min(min_size, len(messages)), min(max_size, len(messages)))
    chosen = rng.sample(messages, size)
    accuracy = sum(grade(m, problem.ground_truth, problem.kind) for m in chosen) / size
    if accuracy <= min_acc:
        return f"with message accuracy <= {min_acc:g}"
    if accuracy >= max_acc:
        return f"with message accuracy >= {max_acc:g}"
    return {
        "id": problem.id,
        "conversation": problem.messages,
        "responses": chosen,
        "ground_truth": problem.ground_truth,
    }
