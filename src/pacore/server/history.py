"""Recent requests in memory, folded from the engine's events, for the trace viewer.

Each chat completion gets a :class:`RequestRecord` fed by the same events
the engine emits to every other consumer; :class:`RequestHistory` keeps the
most recent of them, up to a count and a byte budget. The viewer polls :meth:`RequestRecord.detail` with the
sequence number it has seen, so a running request costs only what changed.

With a :class:`HistoryDatabase`, finished requests are also saved to SQLite
(the last N again), so the viewer still shows them after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError

from pacore import database
from pacore.answers import extract_answer
from pacore.backends.base import Message
from pacore.errors import StoreError, TemplateError
from pacore.messages import last_user_index, last_user_text, text_of
from pacore.prompts import SynthesisTemplate
from pacore.trace import (
    AnswerDelta,
    Confidence,
    Event,
    Final,
    Round,
    RoundFinished,
    RoundStarted,
    Trajectory,
    TrajectoryFinished,
    Usage,
)

logger = logging.getLogger("pacore.server")

#: ``pending``: a batch run's result not run yet (``pacore view``).
Status = Literal["running", "done", "failed", "cancelled", "pending"]

_PREVIEW_CHARS = 240
#: What a kept trajectory costs besides its text: its objects, fields and views.
_TRAJECTORY_OVERHEAD_BYTES = 1024
#: What a record costs besides its text.
_RECORD_OVERHEAD_BYTES = 4096
#: The viewer's copy of a question is cut here, so a history of huge prompts stays small.
_QUESTION_CHARS = 20_000
#: A synthesis prompt longer than this is not kept (an exact prompt or none, never a cut one).
_PROMPT_CHARS = 200_000
_VIEW_FIELDS = {
    "index", "message", "prompt_tokens", "completion_tokens", "latency_s", "finish_reason", "error", "error_kind",
    "stopped",
}  # fmt: skip


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def preview(text: str) -> str:
    """The start of ``text`` as the viewer's list shows it: white space folded, cut with an ellipsis."""
    return _clip(" ".join(text.split()), _PREVIEW_CHARS)


class TrajectoryView(BaseModel):
    seq: int
    index: int
    #: The compacted message passed on to the next round (the final answer for the last round).
    message: str | None
    #: The answer stated in the message, as the evaluator extracts it (only with a grading kind).
    answer: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str | None
    error: str | None
    error_kind: str | None
    #: DeepConf's figures when the backend returned logprobs (never the per-token values).
    confidence: Confidence | None = None
    #: Why an adaptive-compute policy ended it early (``early_stop``, ``quorum``, ``budget``).
    stopped: str | None = None


class AnswerCount(BaseModel):
    answer: str | None
    count: int


class RoundView(BaseModel):
    index: int
    k: int
    final: bool
    finished: bool
    done: int
    failed: int
    completion_tokens: int
    elapsed_s: float
    #: The previous round left no message: the original conversation was sent (see pacore.synthesis).
    bypassed: bool = False
    #: ``(round, index)`` of the previous round's messages ``keep_top`` left out of this round's prompt.
    dropped: list[tuple[int, int]] = Field(default_factory=list)
    #: What an adaptive-compute policy decided for this round.
    policy_note: str | None = None
    #: Votes over the extracted answers (empty without a grading kind).
    distribution: list[AnswerCount]
    #: Trajectories newer than the ``since`` the viewer asked with, in index order.
    trajectories: list[TrajectoryView]
    #: The exact text that replaced the last user message in this synthesis round's
    #: calls; sent once (when newer than ``since``), ``None`` for round 1 or when unknown.
    prompt: str | None = None


class RequestSummary(BaseModel):
    id: str
    #: When the request started and finished (seconds since the epoch; ``None`` while running).
    created: float
    finished: float | None = None
    model: str
    schedule: list[int]
    stream: bool
    status: Status
    question: str
    answer: str | None
    completion_tokens: int
    elapsed_s: float
    #: The grading kind answers are extracted with; ``None``: the answer is shown as text only.
    kind: str | None = None
    #: A batch run's result: where it comes from, its ground truth and grade (``pacore view``).
    title: str | None = None
    ground_truth: str | None = None
    correct: bool | None = None
    #: Why ``correct`` is ``False`` without the answers being compared (see ``ProblemResult.grade_note``).
    grade_note: str | None = None


class RequestDetail(RequestSummary):
    images: int
    error: str | None
    usage: Usage
    #: The final answer so far while it streams; the whole answer once done.
    partial_answer: str
    final_answer: str | None
    seq: int
    rounds: list[RoundView]


class _Round:
    """A round as it fills: the engine's own Round plus what the viewer adds per trajectory."""

    def __init__(self, index: int, k: int, final: bool, bypassed: bool, kind: str | None) -> None:
        self.trace = Round(index=index, k=k, final=final, bypassed=bypassed)
        self.started = time.perf_counter()
        self.finished = False
        self.kind = kind
        self.views: list[TrajectoryView] = []
        self.prompt: str | None = None
        self.prompt_seq = 0

    def add(self, trajectory: Trajectory, seq: int) -> None:
        # The viewer shows compacted messages and confidence figures only; the raw text, reasoning
        # and per-token confidences (the bulk of a long trajectory) are not kept for it.
        confidence = trajectory.confidence.model_copy(update={"tokens": None}) if trajectory.confidence else None
        kept = trajectory.model_copy(update={"text": "", "reasoning": None, "confidence": confidence})
        self.trace.trajectories.append(kept)
        # Without a grading kind there is no "answer" to pull out of, say, a haiku.
        answer = extract_answer(trajectory.message, self.kind) if trajectory.message and self.kind else None
        self.views.append(
            TrajectoryView(seq=seq, answer=answer, confidence=confidence, **trajectory.model_dump(include=_VIEW_FIELDS))
        )

    def view(self, since: int) -> RoundView:
        rnd = self.trace
        votes = Counter(t.answer for t in self.views if t.error is None) if self.kind else Counter()
        return RoundView(
            index=rnd.index,
            k=rnd.k,
            final=rnd.final,
            finished=self.finished,
            done=len(rnd.trajectories),
            failed=rnd.failed,
            completion_tokens=rnd.completion_tokens,
            elapsed_s=rnd.elapsed_s if self.finished else time.perf_counter() - self.started,
            bypassed=rnd.bypassed,
            dropped=rnd.dropped,
            policy_note=rnd.policy_note,
            distribution=[AnswerCount(answer=a, count=c) for a, c in votes.most_common()],
            trajectories=sorted((t for t in self.views if t.seq > since), key=lambda t: t.index),
            prompt=self.prompt if self.prompt_seq > since else None,
        )


class RequestRecord:
    """One request's trace as the viewer shows it."""

    def __init__(
        self,
        request_id: str,
        model: str,
        schedule: list[int],
        messages: list[Message],
        stream: bool,
        *,
        kind: str | None = None,
        template: SynthesisTemplate | None = None,
    ) -> None:
        self.id = request_id
        self.created = time.time()
        self.finished: float | None = None
        self.started = time.perf_counter()
        self.kind = kind
        #: With the template, each synthesis round's prompt is rebuilt from its references.
        self.template = template
        self.problem = last_user_text(messages) if template is not None else ""
        self.total_rounds = len(schedule) + 1
        self.model = model
        self.schedule = schedule
        self.stream = stream
        last = messages[last_user_index(messages) or 0].get("content")
        self.question = _clip(text_of(last), _QUESTION_CHARS)
        self.images = sum(1 for part in last if part.get("type") == "image_url") if isinstance(last, list) else 0
        self.status: Status = "running"
        self.error: str | None = None
        self.answer: str | None = None
        #: The start of the answer the list shows, made once the answer is whole (it never changes after).
        self._answer_preview: str | None = None
        #: Token totals, counted as trajectories finish: the viewer reads them at every poll.
        self.usage = Usage()
        # Pieces, joined when asked for: appending to one string would copy it per piece.
        self._answer_pieces: list[str] = []
        self._answer_chars = 0
        #: How long the request took, once it has ended (see :attr:`elapsed_s`).
        self._elapsed_s: float | None = None
        self.rounds: list[_Round] = []
        self.seq = 0
        #: The text kept (question, compacted messages, errors), in bytes, give or take.
        self._kept_bytes = len(self.question) + _RECORD_OVERHEAD_BYTES

    @property
    def size(self) -> int:
        """What this record holds in memory, about."""
        # Once done, the answer and the partial answer are one string.
        return self._kept_bytes + self._answer_chars

    @property
    def partial_answer(self) -> str:
        """The final answer so far (all of it once done)."""
        if len(self._answer_pieces) > 1:
            self._answer_pieces = ["".join(self._answer_pieces)]
        return self._answer_pieces[0] if self._answer_pieces else ""

    def apply(self, event: Event) -> None:
        self.seq += 1
        if isinstance(event, RoundStarted):
            self.total_rounds = event.total_rounds
            self.rounds.append(_Round(event.round, event.k, event.final, event.bypassed, self.kind))
        elif isinstance(event, TrajectoryFinished):
            self.rounds[event.round].add(event.trajectory, self.seq)
            trajectory = event.trajectory
            self.usage.count(trajectory)
            self._kept_bytes += len(trajectory.message or "") + len(trajectory.error or "") + _TRAJECTORY_OVERHEAD_BYTES
        elif isinstance(event, AnswerDelta):
            self._answer_pieces.append(event.content)
            self._answer_chars += len(event.content)
        elif isinstance(event, RoundFinished):
            rnd = self.rounds[event.round.index]
            rnd.trace.elapsed_s = event.round.elapsed_s
            rnd.finished = True
            self._references(event.round)
        elif isinstance(event, Final):
            result = event.result
            self._elapsed_s = result.elapsed_s
            # A failed request's rounds still say what each was given.
            for finished in result.rounds:
                if finished.index < len(self.rounds) and self.rounds[finished.index].prompt is None:
                    self._references(finished)
            if result.error:
                self.finish("failed", result.error)
            else:
                self.answer = result.answer
                self._answer_preview = preview(result.answer)
                self._answer_pieces, self._answer_chars = [result.answer], len(result.answer)
                self.status = "done"
                self.finished = time.time()
            self.problem = ""  # every prompt is built: the history keeps the clipped question only

    def _references(self, finished: Round) -> None:
        """Rebuild the prompt ``finished`` was sent, from the references it records (in prompt order)."""
        rnd = self.rounds[finished.index]
        rnd.trace.references = list(finished.references)
        rnd.trace.dropped = list(finished.dropped)
        rnd.trace.policy_note = finished.policy_note
        if self.template is None or finished.index == 0 or not finished.references:
            return  # round 1, or a round sent the original conversation: no synthesis prompt
        messages = {(r.trace.index, t.index): t.message for r in self.rounds for t in r.trace.trajectories}
        references = [message for key in finished.references if (message := messages.get(key)) is not None]
        if len(references) < len(finished.references):
            return  # a reference this record never saw: better no prompt than a wrong one
        if len(self.problem) + sum(len(m) for m in references) > _PROMPT_CHARS:
            return
        try:
            prompt = self.template.render(
                problem=self.problem, references=references,
                round=finished.index + 1, total_rounds=self.total_rounds,
            )  # fmt: skip
        except TemplateError:
            return  # the engine rendered it, so this cannot happen; the viewer never breaks a request
        if len(prompt) <= _PROMPT_CHARS:
            rnd.prompt, rnd.prompt_seq = prompt, self.seq

    def finish(self, status: Status, error: str | None = None) -> None:
        """End a request the engine did not finish itself (cancelled, refused, crashed)."""
        if self.status != "running":
            return
        self.seq += 1
        self.status = status
        self.error = error
        self.finished = time.time()
        self.problem = ""
        if self._elapsed_s is None:
            self._elapsed_s = time.perf_counter() - self.started

    @property
    def completion_tokens(self) -> int:
        return self.usage.completion_tokens

    @property
    def elapsed_s(self) -> float:
        """How long the request took, or has taken so far while it runs."""
        return self._elapsed_s if self._elapsed_s is not None else time.perf_counter() - self.started

    def _full_summary(self) -> RequestSummary:
        """The summary with the question and answer whole: each field is this record's attribute of that name."""
        return RequestSummary.model_validate(self, from_attributes=True)

    def summary(self) -> RequestSummary:
        # The list shows the start of the question and of the answer; the detail shows them whole.
        shown = {"question": preview(self.question), "answer": self._answer_preview}
        return self._full_summary().model_copy(update=shown)

    def detail(self, since: int = 0) -> RequestDetail:
        final = self.rounds[-1] if self.rounds and self.rounds[-1].trace.final else None
        # Extracted only with a grading kind (see _Round.add): otherwise the text is the answer.
        final_answer = final.views[0].answer if final and final.views else None
        return RequestDetail(
            **self._full_summary().model_dump(),
            images=self.images,
            error=self.error,
            usage=self.usage.model_copy(),  # a copy: the record's own goes on counting
            partial_answer=self.partial_answer,
            final_answer=final_answer,
            seq=self.seq,
            rounds=[rnd.view(since) for rnd in self.rounds],
        )


class SavedRecord:
    """A finished request read back from a :class:`HistoryDatabase`, shown as it was saved."""

    def __init__(self, summary: RequestSummary, detail: RequestDetail, size: int) -> None:
        self.id = summary.id
        self.status = summary.status
        #: The size of its saved JSON, a fair measure of what it holds in memory.
        self.size = size
        self._summary = summary
        self._detail = detail

    def summary(self) -> RequestSummary:
        return self._summary

    def detail(self, since: int = 0) -> RequestDetail:
        # Finished: the viewer asks once, and merges any repeated trajectory by index.
        return self._detail


def _m001_requests(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE requests (
            id TEXT PRIMARY KEY,
            created REAL NOT NULL,
            summary_json TEXT NOT NULL,
            detail_json TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX requests_by_created ON requests (created)")


HISTORY_MIGRATIONS: list[database.Migration] = [_m001_requests]


class HistoryDatabase:
    """The last ``capacity`` finished requests in a SQLite file, written off the event loop."""

    def __init__(self, path: str | Path, capacity: int) -> None:
        self.path = Path(path)
        self.capacity = capacity
        try:
            self.db = database.connect(self.path)
            database.migrate(self.db, HISTORY_MIGRATIONS)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot use history database {self.path}: {exc}") from None
        # One thread: writes stay in order, and a slow disk never stalls the server.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pacore-history")
        self._closed = False

    def load(self) -> list[SavedRecord]:
        """The saved requests, oldest first (rows this version cannot read are left out)."""
        rows = self.db.execute(
            "SELECT summary_json, detail_json FROM requests ORDER BY created DESC LIMIT ?", (self.capacity,)
        ).fetchall()
        saved = []
        for row in reversed(rows):
            try:
                summary = RequestSummary.model_validate_json(row["summary_json"])
                detail = RequestDetail.model_validate_json(row["detail_json"])
                saved.append(SavedRecord(summary, detail, len(row["summary_json"]) + len(row["detail_json"])))
            except ValidationError as exc:
                logger.warning("history database %s: skipping a request saved in another format: %s", self.path, exc)
        return saved

    def save(self, record: RequestRecord) -> None:
        """Queue the writing of a finished request (a request ended during shutdown is not saved)."""
        if self._closed:
            return
        future = self._worker.submit(
            self._write, record.id, record.created, record.summary().model_dump_json(),
            record.detail().model_dump_json(),
        )  # fmt: skip
        future.add_done_callback(self._written)

    def _write(self, request_id: str, created: float, summary: str, detail: str) -> None:
        with database.transaction(self.db) as db:
            db.execute(
                "INSERT OR REPLACE INTO requests (id, created, summary_json, detail_json) VALUES (?, ?, ?, ?)",
                (request_id, created, summary, detail),
            )
            db.execute(
                "DELETE FROM requests WHERE id NOT IN (SELECT id FROM requests ORDER BY created DESC LIMIT ?)",
                (self.capacity,),
            )

    def _written(self, future: Future[None]) -> None:
        if not future.cancelled() and (error := future.exception()) is not None:
            logger.warning("could not save a request to %s: %s", self.path, error)

    async def aclose(self) -> None:
        """Finish the writes under way, then close the file."""
        self._closed = True
        await asyncio.to_thread(self._worker.shutdown, wait=True)
        self.db.close()


AnyRecord = TypeVar("AnyRecord", RequestRecord, SavedRecord)


class RequestHistory:
    """The most recent requests: at most ``capacity`` of them, holding at most ``max_bytes``.

    Over either bound, the oldest finished requests are forgotten first (a
    running one only when no finished one is left); ``dropped`` counts them,
    and ``on_drop`` hears of each. With a ``database``, its saved requests
    are shown too and every finished request is saved to it (see
    :meth:`finished`).
    """

    def __init__(
        self,
        capacity: int,
        database: HistoryDatabase | None = None,
        *,
        max_bytes: int | None = None,
        on_drop: Callable[[RequestRecord | SavedRecord], None] | None = None,
    ) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.database = database
        self.on_drop = on_drop
        self.dropped = 0
        self._records: OrderedDict[str, RequestRecord | SavedRecord] = OrderedDict()
        for saved in database.load() if database else ():
            self.add(saved)

    @property
    def size(self) -> int:
        """Bytes the kept requests hold, about."""
        return sum(record.size for record in self._records.values())

    def add(self, record: AnyRecord) -> AnyRecord:
        self._records[record.id] = record
        self._trim()
        return record

    def _trim(self) -> None:
        # Records grow while they run, so the budget is checked again as each one finishes.
        size = self.size if self.max_bytes is not None else 0
        while self._records:
            oldest_finished = next((r for r in self._records.values() if r.status != "running"), None)
            if len(self._records) > self.capacity:
                victim = oldest_finished or next(iter(self._records.values()))
            elif self.max_bytes is not None and size > self.max_bytes and oldest_finished is not None:
                victim = oldest_finished  # a running request is never forgotten for its size
            else:
                return
            del self._records[victim.id]
            size -= victim.size
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop(victim)

    def finished(self, record: RequestRecord) -> None:
        """A request has ended: keep it within the budget, and save it if there is a database."""
        self._trim()
        if self.database is not None and record.id in self._records:
            self.database.save(record)

    async def aclose(self) -> None:
        if self.database is not None:
            await self.database.aclose()

    def get(self, request_id: str) -> RequestRecord | SavedRecord | None:
        return self._records.get(request_id)

    def recent(self) -> list[RequestRecord | SavedRecord]:
        """Newest first."""
        return list(reversed(self._records.values()))
