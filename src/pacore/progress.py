"""A request's progress folded from the engine's events, and the lines that describe it.

Shared by every front door that reports progress: the CLI's displays
(:mod:`pacore.cli.progress` draws them with rich) and the server's streamed
progress notes. Plain text only: no terminal, rich or typer here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pacore import trace
from pacore.answers import extract_answer


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
    usage: trace.Usage = field(default_factory=trace.Usage)
    started: float = field(default_factory=time.perf_counter)
    #: Tokens received so far by each trajectory of the current round still running.
    streaming: dict[int, int] = field(default_factory=dict)
    #: Tokens of the current round's finished trajectories.
    round_tokens: int = 0
    round_started: float = field(default_factory=time.perf_counter)
    #: Most tokens a call may generate, when known: bounds the ETA.
    max_tokens: int | None = None
    #: Successful trajectories (and their tokens) of the current round, then of the whole request.
    round_ok: int = 0
    round_ok_tokens: int = 0
    request_ok: int = 0
    request_ok_tokens: int = 0

    def apply(self, event: trace.Event) -> None:
        if isinstance(event, trace.RoundStarted):
            self.total_rounds = event.total_rounds
            self.round, self.k, self.final = event.round, event.k, event.final
            self.done = self.failed = self.round_tokens = self.round_ok = self.round_ok_tokens = 0
            self.streaming = {}
            self.round_started = time.perf_counter()
        elif isinstance(event, trace.TrajectoryProgress):
            if event.round == self.round:
                self.streaming.update(event.tokens)
        elif isinstance(event, trace.AnswerDelta):
            self.streaming[0] = self.streaming.get(0, 0) + 1  # about one token a delta
        elif isinstance(event, trace.TrajectoryFinished):
            trajectory = event.trajectory
            self.done = event.done
            self.failed += 0 if trajectory.ok else 1
            self.streaming.pop(trajectory.index, None)
            self.round_tokens += trajectory.completion_tokens
            if trajectory.ok:
                self.round_ok += 1
                self.round_ok_tokens += trajectory.completion_tokens
                self.request_ok += 1
                self.request_ok_tokens += trajectory.completion_tokens
            self.usage.calls += 1
            self.usage.failed_calls += 0 if trajectory.ok else 1
            self.usage.prompt_tokens += trajectory.prompt_tokens
            self.usage.completion_tokens += trajectory.completion_tokens

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def streamed_tokens(self) -> int:
        """Tokens received so far by the current round's running trajectories."""
        return sum(self.streaming.values())

    @property
    def tokens(self) -> int:
        """Tokens generated so far in the request, those still streaming included."""
        return self.usage.completion_tokens + self.streamed_tokens

    def tokens_per_s(self) -> float:
        """The current round's generation rate so far."""
        elapsed = time.perf_counter() - self.round_started
        return (self.round_tokens + self.streamed_tokens) / elapsed if elapsed > 0 else 0.0

    def expected_tokens(self) -> float | None:
        """Tokens a trajectory of the current round is expected to generate.

        The mean of the round's finished trajectories; before any has finished,
        the mean of the request's earlier ones (a synthesis answer is about as
        long as the answers it reads); before that, ``max_tokens`` if known.
        """
        if self.round_ok:
            expected: float | None = self.round_ok_tokens / self.round_ok
        elif self.request_ok:
            expected = self.request_ok_tokens / self.request_ok
        else:
            expected = self.max_tokens
        if expected is not None and self.max_tokens:
            expected = min(expected, self.max_tokens)
        return expected

    def eta_s(self) -> float | None:
        """Rough seconds left in the current round; ``None`` until it can be estimated.

        The tokens the unfinished trajectories are expected to still generate
        (see :meth:`expected_tokens`, less what each has streamed), divided by
        the round's token rate so far.
        """
        expected, rate = self.expected_tokens(), self.tokens_per_s()
        if expected is None or rate <= 0:
            return None
        waiting = max(self.k - self.done - len(self.streaming), 0)
        remaining = waiting * expected + sum(max(expected - tokens, 0.0) for tokens in self.streaming.values())
        return remaining / rate

    def eta_label(self) -> str:
        """E.g. ``ETA ~12.0s``; empty when the ETA is unknown."""
        eta = self.eta_s()
        return "" if eta is None else f"ETA ~{format_duration(eta)}"

    def streaming_label(self) -> str:
        """E.g. ``3 streaming (longest 1,234 tokens) · 87 tok/s``; empty when nothing streams."""
        if not self.streaming:
            return ""
        longest = max(self.streaming.values())
        label = f"{len(self.streaming)} streaming (longest {longest:,} tokens) · {self.tokens_per_s():,.0f} tok/s"
        eta = self.eta_label()
        return f"{label} · {eta}" if eta else label

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


def summary_line(result: trace.Result) -> str:
    """One line about a finished request: rounds, calls, tokens, time."""
    usage = result.usage
    calls = f"{usage.calls} call{'s' if usage.calls != 1 else ''}" + (
        f" ({usage.failed_calls} failed)" if usage.failed_calls else ""
    )
    rounds = len(result.rounds)
    stopped = sum(1 for rnd in result.rounds for t in rnd.trajectories if t.stopped)
    if stopped:
        calls += f", {stopped} stopped early by a policy"
    return (
        f"{rounds} round{'s' if rounds != 1 else ''}, {calls}, "
        f"{usage.completion_tokens:,} effective TTC tokens, "
        f"{usage.prompt_tokens:,} prompt tokens, {format_duration(result.elapsed_s)}"
    )


def round_line(rnd: trace.Round, total_rounds: int) -> str:
    """One line about a finished round, e.g. ``round 1/2: 4/4 trajectories, 812 tokens, 9.1s``."""
    failed = f" ({rnd.failed} failed)" if rnd.failed else ""
    final = " (final)" if rnd.final else ""
    if rnd.bypassed:
        final += " (no references: sent the question as is)"
    return (
        f"round {rnd.index + 1}/{total_rounds}{final}: {rnd.succeeded}/{rnd.k} trajectories{failed}, "
        f"{rnd.completion_tokens:,} tokens, {format_duration(rnd.elapsed_s)}"
    )


#: Characters of a trajectory's opening shown per trajectory by ``--show-rounds``.
OPENING_CHARS = 60


def opening(text: str, chars: int = OPENING_CHARS) -> str:
    """``text``'s first words on one line, cut with an ellipsis after ``chars`` characters."""
    words = " ".join(text.split())
    return words if len(words) <= chars else words[: chars - 1].rstrip() + "…"


def trajectory_line(trajectory: trace.Trajectory) -> str:
    """E.g. ``#2 · 41 tokens · answer: Paris · "The capital of France is Paris..."``.

    With confidence recorded, its mean and lowest group confidence follow the tokens.
    """
    head = f"#{trajectory.index + 1} · {trajectory.completion_tokens:,} tokens"
    if (confidence := trajectory.confidence) is not None:
        head += f" · confidence {confidence.mean:.2f} (lowest group {confidence.lowest_group:.2f})"
    if not trajectory.ok:
        return f"{head} · failed: {opening(trajectory.error or 'unknown error')}"
    if trajectory.stopped:
        return f"{head} · stopped by {trajectory.stopped.replace('_', ' ')}: contributes no message"
    if trajectory.message is None:
        return f"{head} · no message (the next round does not read it)"
    answer = extract_answer(trajectory.message)
    stated = f" · answer: {opening(answer, 30)}" if answer else ""
    return f'{head}{stated} · "{opening(trajectory.message)}"'


def round_details(rnd: trace.Round) -> list[str]:
    """What a finished round did, for ``--show-rounds``: what it read, then one line per trajectory."""
    lines = []
    if rnd.references:
        calls = "the synthesis call" if rnd.k == 1 else f"each of the {rnd.k} synthesis calls"
        answers = "the answer" if len(rnd.references) == 1 else f"the {len(rnd.references)} answers"
        lines.append(f"  {calls} read {answers} of round {rnd.index}")
    if rnd.dropped:
        left_out = ", ".join(f"#{index + 1}" for _round, index in rnd.dropped)
        lines.append(f"  keep-top left out the least confident of round {rnd.index}: {left_out}")
    if rnd.policy_note:
        lines.append(f"  policy: {rnd.policy_note}")
    lines.extend(f"  {trajectory_line(t)}" for t in rnd.trajectories)
    return lines


def finished_round_lines(event: trace.Event, state: ProgressState, details: bool = False) -> list[str]:
    """The lines to print for ``event`` if it ends a round that produced something.

    A round where nothing succeeded ends the request, and its error says so.
    """
    if isinstance(event, trace.RoundFinished) and event.round.succeeded:
        line = round_line(event.round, state.total_rounds)
        return [line, *round_details(event.round)] if details else [line]
    return []
