"""Progress of a request on stderr, folded from the engine's events.

:class:`ProgressState` turns events into the figures a display shows and
knows nothing about terminals, so other commands (``pacore run``) can reuse
it. On a terminal, :class:`LiveProgress` redraws one status line in place;
elsewhere (CI logs, pipes), :class:`LineProgress` prints one short line per
finished round.
"""

from __future__ import annotations

import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from pacore.trace import Event, Result, Round, RoundFinished, RoundStarted, TrajectoryFinished, Usage


@dataclass
class ProgressState:
    """What a progress display shows, updated by :meth:`apply` for each event."""

    #: Rounds the request runs, the final one included (0 until the first round starts).
    total_rounds: int = 0
    #: 0-based index of the current round.
    round: int = 0
    k: int = 0
    final: bool = False
    done: int = 0
    failed: int = 0
    usage: Usage = field(default_factory=Usage)
    started: float = field(default_factory=time.perf_counter)

    def apply(self, event: Event) -> None:
        if isinstance(event, RoundStarted):
            self.total_rounds = event.total_rounds
            self.round, self.k, self.final = event.round, event.k, event.final
            self.done = self.failed = 0
        elif isinstance(event, TrajectoryFinished):
            trajectory = event.trajectory
            self.done = event.done
            self.failed += 0 if trajectory.ok else 1
            self.usage.calls += 1
            self.usage.failed_calls += 0 if trajectory.ok else 1
            self.usage.prompt_tokens += trajectory.prompt_tokens
            self.usage.completion_tokens += trajectory.completion_tokens

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def round_label(self) -> str:
        label = f"round {self.round + 1}/{self.total_rounds}"
        return f"{label} (final)" if self.final else label

    def trajectories_label(self) -> str:
        text = f"{self.done}/{self.k} trajectories"
        return f"{text} ({self.failed} failed)" if self.failed else text


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def summary_line(result: Result) -> str:
    """One line about a finished request: rounds, calls, tokens, time."""
    usage = result.usage
    calls = f"{usage.calls} call{'s' if usage.calls != 1 else ''}" + (
        f" ({usage.failed_calls} failed)" if usage.failed_calls else ""
    )
    rounds = len(result.rounds)
    return (
        f"{rounds} round{'s' if rounds != 1 else ''}, {calls}, "
        f"{usage.completion_tokens:,} effective TTC tokens, "
        f"{usage.prompt_tokens:,} prompt tokens, {format_duration(result.elapsed_s)}"
    )


def round_line(rnd: Round, total_rounds: int) -> str:
    """One line about a finished round, e.g. ``round 1/2: 4/4 trajectories, 812 tokens, 9.1s``."""
    failed = f" ({rnd.failed} failed)" if rnd.failed else ""
    final = " (final)" if rnd.final else ""
    if rnd.bypassed:
        final += " (no references: sent the question as is)"
    return (
        f"round {rnd.index + 1}/{total_rounds}{final}: {rnd.succeeded}/{rnd.k} trajectories{failed}, "
        f"{rnd.completion_tokens:,} tokens, {format_duration(rnd.elapsed_s)}"
    )


def finished_round_line(event: Event, state: ProgressState) -> str | None:
    """The line to print for ``event`` if it ends a round that produced something.

    A round where nothing succeeded ends the request, and its error says so.
    """
    if isinstance(event, RoundFinished) and event.round.succeeded:
        return round_line(event.round, state.total_rounds)
    return None


class LineProgress:
    """One plain line per finished round, for logs and pipes."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self.state = ProgressState()

    def handle(self, event: Event) -> None:
        self.state.apply(event)
        if line := finished_round_line(event, self.state):
            print(line, file=self.file, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


_MIN_BAR_WIDTH = 8
_MAX_BAR_WIDTH = 30


class LiveProgress:
    """A status line redrawn in place on a terminal, erased when the request ends."""

    def __init__(self, console: Console) -> None:
        self.state = ProgressState()
        self.spinner = Spinner("dots", style="cyan")
        self.live = Live(
            console=console,
            get_renderable=self.render,
            refresh_per_second=8,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def handle(self, event: Event) -> None:
        self.state.apply(event)
        if line := finished_round_line(event, self.state):
            # Printed above the status line, so finished rounds stay on screen.
            self.live.console.print(line, highlight=False, markup=False)

    def render(self) -> RenderableType:
        state = self.state
        grid = Table.grid(padding=(0, 1))
        if not state.total_rounds:
            grid.add_row(self.spinner, Text("starting...", style="dim"))
            return grid
        label = Text(state.round_label(), style="bold", no_wrap=True)
        status = Text.assemble(
            state.trajectories_label(),
            (f" · {state.usage.completion_tokens:,} tokens", "green"),
            (f" · {format_duration(state.elapsed_s)}", "dim"),
            no_wrap=True,
            overflow="ellipsis",
        )
        # The bar takes what the text leaves of the line, and goes when that is too little.
        room = self.live.console.width - label.cell_len - status.cell_len - 5  # spinner, padding
        if room >= _MIN_BAR_WIDTH:
            bar = ProgressBar(total=max(state.k, 1), completed=state.done, width=min(room, _MAX_BAR_WIDTH))
            grid.add_row(self.spinner, label, bar, status)
        else:
            grid.add_row(self.spinner, label, status)
        return grid

    def __enter__(self) -> LiveProgress:
        self.live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.live.stop()


Progress = LiveProgress | LineProgress


def open_progress(
    quiet: bool = False, file: TextIO | None = None
) -> AbstractContextManager[Progress | None]:
    """The right display for ``file`` (stderr by default); ``None`` when quiet.

    Use as ``with open_progress(quiet) as progress:`` and pass
    ``progress.handle`` as the engine's ``on_event``.
    """
    if quiet:
        return nullcontext(None)
    file = file or sys.stderr
    console = Console(file=file)
    if console.is_terminal and not console.is_dumb_terminal:
        return LiveProgress(console)
    return LineProgress(file)
