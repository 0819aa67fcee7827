"""The answer of ``pacore ask`` on stdout, written as the final round generates it.

Imported when ``pacore ask`` runs a request: declaring the command needs none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

from pacore.messages import THINK_END
from pacore.trace import AnswerDelta, Event, RoundStarted, TrajectoryFinished

if TYPE_CHECKING:
    from pacore.cli.progress import Progress

THINK_START = "<think>"


def _held_back(text: str, marker: str) -> int:
    """How many final characters of ``text`` could start ``marker`` (kept until more text tells)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class AnswerStream:
    """Writes the final answer to ``out`` as it is generated.

    What it writes in all is what printing ``Result.answer`` and a newline
    writes: the answer is the final message stripped, so leading whitespace
    is dropped and trailing whitespace held back until more text follows;
    inline reasoning (up to the last ``</think>``) is not the answer, so text
    is held back while it may be reasoning. A model whose reasoning has no
    opening ``<think>`` in its output cannot be told apart until its
    ``</think>`` arrives: then the stream stops and the whole answer is
    printed again on a new line when it is known (``diverged`` is set).
    """

    def __init__(self, out: TextIO, progress: Progress | None) -> None:
        self.out = out
        self.progress = progress
        self.received = ""
        self.written = ""
        self.final_round = False
        self.finished = False
        self.diverged = False

    def handle(self, event: Event) -> None:
        if isinstance(event, RoundStarted):
            self.final_round = event.final
        elif isinstance(event, AnswerDelta) and event.content and not (self.finished or self.diverged):
            self.received += event.content
            self._write_known_part()
        elif isinstance(event, TrajectoryFinished) and self.final_round and not self.finished:
            self.finished = True
            trajectory = event.trajectory
            if trajectory.ok:  # the engine's answer: the final message, stripped
                self._finish((trajectory.message or "").strip())
            elif self.written:  # the round fails and its error follows on stderr
                self._emit("\n")

    def end_line(self) -> None:
        """End a partly written answer's line (the request failed or was interrupted mid-stream)."""
        if self.written and not self.finished:
            self.finished = True
            self._emit("\n")

    def _answer_so_far(self) -> str:
        """The part of the answer the text received so far already determines."""
        text = self.received
        cut = text.rfind(THINK_END)
        if cut >= 0:
            text = text[cut + len(THINK_END) :]
        elif (head := text.lstrip()).startswith(THINK_START) or THINK_START.startswith(head):
            return ""  # reasoning (or the start of its tag), not the answer
        text = text[: len(text) - _held_back(text, THINK_END)]
        return text.strip()

    def _write_known_part(self) -> None:
        known = self._answer_so_far()
        if known.startswith(self.written):
            self._emit(known[len(self.written) :])
        else:
            self.diverged = True  # text already written was reasoning (see the class docstring)

    def _finish(self, answer: str) -> None:
        if self.diverged or not answer.startswith(self.written):
            self.diverged = True
            self._emit(("\n" if self.written else "") + answer + "\n")
        else:
            self._emit(answer[len(self.written) :] + "\n")

    def _emit(self, text: str) -> None:
        if not text:
            return
        if not self.written and self.progress is not None:
            self.progress.pause()  # a status line redrawn on the same screen would tear the text
        self.written += text
        self.out.write(text)
        self.out.flush()
