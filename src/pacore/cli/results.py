"""How the run and report commands word a run's results, shared so both say it alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pacore.eval.report import ArmReport


def results_unit(repeats: int) -> str:
    """What a run's results count: problems, or problem repeats when each problem runs several times."""
    return "problems" if repeats == 1 else "problem repeats"


def interval_text(arm: ArmReport) -> str:
    """An arm's 95% accuracy interval as `` [lo, hi]``, or nothing when it has none."""
    from pacore.eval import report  # on use: declaring the commands must not load the report code

    interval = arm.interval
    return f" [{report.percent(interval[0])}, {report.percent(interval[1])}]" if interval else ""
