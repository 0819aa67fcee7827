"""How the run and report commands word a run's results, shared so both say it alike."""

from __future__ import annotations

from pacore.eval import report


def results_unit(repeats: int) -> str:
    """What a run's results count: problems, or problem repeats when each problem runs several times."""
    return "problems" if repeats == 1 else "problem repeats"


def interval_text(arm: report.ArmReport) -> str:
    """An arm's 95% accuracy interval as `` [lo, hi]``, or nothing when it has none."""
    interval = arm.interval
    return f" [{report.percent(interval[0])}, {report.percent(interval[1])}]" if interval else ""
