"""Progress of a request on stderr, drawn from the engine's events.

The events are folded by :class:`pacore.progress.ProgressState` (no terminal
code, shared with the server). On a terminal, :class:`LiveProgress` redraws
one status line in place; elsewhere (CI logs, pipes), :class:`LineProgress`
prints one short line per finished round.
"""

from __future__ import annotations

import sys
import time
from contextlib import AbstractContextManager, nullcontext
from typing import TextIO

from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from pacore.progress import (
    OPENING_CHARS,
    ProgressState,
    finished_round_lines,
    format_duration,
    opening,
    round_details,
    round_line,
    summary_line,
    trajectory_line,
)
from pacore.trace import Event, TrajectoryProgress

# The text helpers lived here first; they stay importable from this module.
__all__ = [
    "OPENING_CHARS", "STREAMING_LINE_INTERVAL_S", "LineProgress", "LiveProgress", "Progress", "ProgressState",
    "finished_round_lines", "format_duration", "opening", "open_progress", "round_details", "round_line",
    "summary_line", "trajectory_line",
]  # fmt: skip


#: Seconds between two "still streaming" lines of :class:`LineProgress`.
STREAMING_LINE_INTERVAL_S = 30.0


class LineProgress:
    """One plain line per finished round, for logs and pipes, and one every
    ``STREAMING_LINE_INTERVAL_S`` while long calls stream."""

    def __init__(self, file: TextIO, max_tokens: int | None = None, show_rounds: bool = False) -> None:
        self.file = file
        self.state = ProgressState(max_tokens=max_tokens)
        self.show_rounds = show_rounds
        self.next_streaming_line = time.perf_counter() + STREAMING_LINE_INTERVAL_S

    def handle(self, event: Event) -> None:
        state = self.state
        state.apply(event)
        if lines := finished_round_lines(event, state, self.show_rounds):
            print("\n".join(lines), file=self.file, flush=True)
        elif isinstance(event, TrajectoryProgress) and time.perf_counter() >= self.next_streaming_line:
            self.next_streaming_line = time.perf_counter() + STREAMING_LINE_INTERVAL_S
            line = f"{state.round_label()}: {state.trajectories_label()}, {state.streaming_label()}"
            print(line, file=self.file, flush=True)

    def pause(self) -> None:
        """Nothing to do: this display never redraws a line."""

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


_MIN_BAR_WIDTH = 8
_MAX_BAR_WIDTH = 30


class LiveProgress:
    """A status line redrawn in place on a terminal, erased when the request ends."""

    def __init__(self, console: Console, max_tokens: int | None = None, show_rounds: bool = False) -> None:
        self.state = ProgressState(max_tokens=max_tokens)
        self.show_rounds = show_rounds
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
        for line in finished_round_lines(event, self.state, self.show_rounds):
            # Printed above the status line, so finished rounds stay on screen.
            self.live.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def pause(self) -> None:
        """Erase the status line and stop redrawing it (the answer is being streamed to the same screen)."""
        self.live.stop()

    def render(self) -> RenderableType:
        state = self.state
        grid = Table.grid(padding=(0, 1))
        if not state.total_rounds:
            grid.add_row(self.spinner, Text("starting...", style="dim"))
            return grid
        label = Text(state.round_label(), style="bold", no_wrap=True)
        streaming = state.streaming_label()
        status = Text.assemble(
            state.trajectories_label(),
            (f" · {state.tokens:,} tokens", "green"),
            (f" · {streaming}" if streaming else "", "cyan"),
            (f" · {state.eta_label()}" if not streaming and state.eta_label() else "", "cyan"),
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
    quiet: bool = False, file: TextIO | None = None, *, max_tokens: int | None = None, show_rounds: bool = False
) -> AbstractContextManager[Progress | None]:
    """The right display for ``file`` (stderr by default); ``None`` when quiet.

    Use as ``with open_progress(quiet) as progress:`` and pass
    ``progress.handle`` as the engine's ``on_event``. ``max_tokens`` (the
    per-call limit, when known) bounds the ETA; ``show_rounds`` adds what
    each finished round did (see :func:`round_details`).
    """
    if quiet:
        return nullcontext(None)
    file = file or sys.stderr
    console = Console(file=file)
    if console.is_terminal and not console.is_dumb_terminal:
        return LiveProgress(console, max_tokens, show_rounds)
    return LineProgress(file, max_tokens, show_rounds)
