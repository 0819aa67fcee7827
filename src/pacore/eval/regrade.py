"""Re-grading a run: its stored answers graded again with the current grader (``pacore regrade``).

A run keeps the grades its results got when they were run, and a resumed run
skips done results; when the grader improves, :func:`regrade_run` brings the
run up to date without generating anything: every done result with a ground
truth is graded again from its stored answer by
:func:`pacore.eval.runner.grade_answer` (the step ``pacore run`` grades with),
and only what changed is written back.

Safe on a run that ``pacore run`` is writing: the store is opened as a reader
(no run lock), grading happens outside any transaction, and each batch of
changes is one short write transaction that skips a result redone meanwhile.
Idempotent: a second regrade finds nothing to change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pacore.errors import RunConflictError
from pacore.eval.runner import grade_answer
from pacore.store import ArmInfo, ProblemResult, RepeatKey, RunStore, StoredProblem

# Results graded between two writes: each write transaction stays short, and an
# interrupted regrade keeps what it wrote.
_BATCH = 256


@dataclass(slots=True)
class RegradeCounts:
    """What re-grading one arm found and changed."""

    arm: str
    #: Done results with a ground truth, graded again.
    checked: int = 0
    #: Results whose extracted answer, grade or grade note changed (and were written).
    updated: int = 0
    right_to_wrong: int = 0
    wrong_to_right: int = 0
    #: Results now graded incorrect without being judged that were not, and the reverse.
    notes_added: int = 0
    notes_cleared: int = 0

    def count(self, old: ProblemResult, new: ProblemResult) -> None:
        self.updated += 1
        self.right_to_wrong += bool(old.correct) and new.correct is False
        self.wrong_to_right += old.correct is not True and bool(new.correct)
        self.notes_added += old.grade_note is None and new.grade_note is not None
        self.notes_cleared += old.grade_note is not None and new.grade_note is None

    def line(self) -> str:
        """One line for the CLI: ``majority-8: 40 results checked, 3 updated (...)``."""
        changes = (
            f"{self.wrong_to_right} wrong->right, {self.right_to_wrong} right->wrong; "
            f"grade notes: {self.notes_added} added, {self.notes_cleared} cleared"
        )
        return f"{self.arm}: {self.checked} results checked, {self.updated} updated ({changes})"


def regrade_run(run_dir: str | Path, arms: Sequence[str] = ()) -> list[RegradeCounts]:
    """Grade every done result of ``run_dir`` (of ``arms`` only, if given) again; per arm, what changed.

    An unknown arm is a :class:`~pacore.errors.RunConflictError` (a usage error), raised before anything is graded.
    """
    with RunStore.open(run_dir) as store:
        known = {arm.name: arm for arm in store.arms()}
        unknown = [name for name in arms if name not in known]
        if unknown:
            raise RunConflictError(f"{store.run_dir} has no arm {unknown[0]!r} (it has {', '.join(known) or 'none'})")
        problems = {p.id: p for p in store.problems() if p.ground_truth is not None}
        chosen = [known[name] for name in dict.fromkeys(arms)] if arms else list(known.values())
        return [_regrade_arm(store, arm, problems) for arm in chosen]


def _regrade_arm(store: RunStore, arm: ArmInfo, problems: dict[str, StoredProblem]) -> RegradeCounts:
    counts = RegradeCounts(arm.name)
    # Read whole before any write: no read stays open across the write transactions.
    stored = [r for r in store.results(arm.name, traces=False) if r.status == "done" and r.problem_id in problems]
    for start in range(0, len(stored), _BATCH):
        changed: dict[RepeatKey, tuple[ProblemResult, ProblemResult]] = {}
        for old in stored[start : start + _BATCH]:
            problem = problems[old.problem_id]
            grade = grade_answer(arm.method, old.answer, problem.ground_truth, problem.kind)
            counts.checked += 1
            if (grade.extracted, grade.correct, grade.note) != (old.extracted, old.correct, old.grade_note):
                new = dataclasses.replace(old, extracted=grade.extracted, correct=grade.correct, grade_note=grade.note)
                changed[old.key] = (old, new)
        for new in store.update_grades(arm.name, [new for _, new in changed.values()]):
            counts.count(changed[new.key][0], new)
    return counts
