"""The trace viewer over a batch run's stored results (``pacore view RUN_DIR``), read-only.

Every result of every arm (one per problem, seed and repeat) is a "request"
of the viewer: its stored trace is replayed through the same
:class:`~pacore.server.history.RequestRecord` the server folds live events
into, so a run's traces look exactly like a server's, with the problem's
ground truth and grade added (and the grade note of an answer graded wrong
without being judged). Nothing here writes to the run (opening an
older run's store upgrades its schema, as every reader of a run does).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import RedirectResponse

from pacore.errors import PacoreError, RunConflictError
from pacore.eval.figures import result_span
from pacore.messages import last_user_text
from pacore.prompts import SynthesisTemplate
from pacore.schedule import Schedule
from pacore.server.app import mount_viewer
from pacore.server.errors import install_error_handlers
from pacore.server.history import RequestDetail, RequestRecord, RequestSummary, preview
from pacore.store import ArmInfo, ProblemResult, RunInfo, RunStore, StoredProblem
from pacore.trace import Final, RoundFinished, RoundStarted, TrajectoryFinished


def result_id(arm: str, result: ProblemResult) -> str:
    """``arm/problem/seed/repeat``: arm names hold no ``/``, so a problem id may."""
    return f"{arm}/{result.problem_id}/{result.seed}/{result.repeat}"


def parse_result_id(request_id: str) -> tuple[str, str, int, int] | None:
    arm, _, rest = request_id.partition("/")
    problem_id, *numbers = rest.rsplit("/", 2)
    if len(numbers) != 2 or not all(n.isdigit() for n in numbers):
        return None
    return arm, problem_id, int(numbers[0]), int(numbers[1])


def run_template(info: RunInfo) -> SynthesisTemplate | None:
    """The synthesis template the run used, if it can still be loaded with the same bytes."""
    stored = info.config.get("template") or {}
    candidates = [SynthesisTemplate.default]
    if origin := stored.get("origin"):
        candidates.append(lambda: SynthesisTemplate.load(origin))
    for load in candidates:
        try:
            template = load()
        except (PacoreError, OSError):
            continue
        if hashlib.sha256(template.source.encode("utf-8")).hexdigest() == stored.get("sha256"):
            return template
    return None


class RunView:
    """A run directory's results as the viewer's requests."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        with self._open() as store:  # refuses what is not a run, before anything is served
            info = store.run_info()
        if info is None:
            raise RunConflictError(f"{self.run_dir} has no run yet: start it with 'pacore run'")
        self.info = info
        self.template = run_template(info)

    def _open(self) -> RunStore:
        # One connection per call: requests are served from several threads.
        return RunStore.open(self.run_dir)

    def _summary(self, arm: ArmInfo, result: ProblemResult, problem: StoredProblem, repeated: bool) -> RequestSummary:
        span = result_span(result)
        title = f"{problem.id} · {arm.name}" + (f" · seed {result.seed} repeat {result.repeat}" if repeated else "")
        return RequestSummary(
            id=result_id(arm.name, result),
            created=span[0].timestamp() if span else 0.0,
            finished=span[1].timestamp() if span else None,
            model=str(self.info.config.get("model") or ""),
            schedule=Schedule.parse(arm.schedule).as_list() if arm.method == "pacore" and arm.schedule else [],
            stream=False,
            status="pending" if result.status == "pending" else result.status,  # type: ignore[arg-type]
            # The list shows the start of the question and of the answer, as for live requests.
            question=preview(last_user_text(problem.messages)),
            answer=None if result.answer is None else preview(result.answer),
            completion_tokens=result.completion_tokens,
            elapsed_s=result.wall_s or 0.0,
            kind=problem.kind,
            title=title,
            ground_truth=problem.ground_truth,
            correct=result.correct,
            grade_note=result.grade_note,
        )

    def summaries(self) -> list[RequestSummary]:
        """Every result, arm by arm, in data set order."""
        summaries = []
        with self._open() as store:
            problems = {p.id: p for p in store.problems()}
            for arm in store.arms():
                results = list(store.results(arm.name, traces=False))
                repeated = len({(r.seed, r.repeat) for r in results}) > 1
                summaries += [self._summary(arm, r, problems[r.problem_id], repeated) for r in results]
        return summaries

    def _load(self, request_id: str) -> tuple[ArmInfo, ProblemResult, StoredProblem, bool] | None:
        key = parse_result_id(request_id)
        if key is None:
            return None
        name, problem_id, seed, repeat = key
        with self._open() as store:
            arm = next((a for a in store.arms() if a.name == name), None)
            result = store.result(name, problem_id, seed, repeat) if arm is not None else None
            if arm is None or result is None:
                return None
            problem = next(p for p in store.problems() if p.id == problem_id)
            repeated = store.db.execute(
                "SELECT COUNT(*) > COUNT(DISTINCT problem_id) FROM results WHERE arm = ?", (name,)
            ).fetchone()[0]
        return arm, result, problem, bool(repeated)

    def detail(self, request_id: str) -> RequestDetail | None:
        loaded = self._load(request_id)
        if loaded is None:
            return None
        arm, result, problem, repeated = loaded
        summary = self._summary(arm, result, problem, repeated)
        record = RequestRecord(
            summary.id, summary.model, summary.schedule, problem.messages, False,
            kind=problem.kind, template=self.template,
        )  # fmt: skip
        trace = result.trace
        if trace is not None:
            total = len(trace.schedule) + 1
            for rnd in trace.rounds:
                record.apply(
                    RoundStarted(round=rnd.index, k=rnd.k, final=rnd.final, total_rounds=total, bypassed=rnd.bypassed)
                )
                for done, trajectory in enumerate(rnd.trajectories, 1):
                    record.apply(TrajectoryFinished(round=rnd.index, trajectory=trajectory, done=done, k=rnd.k))
                record.apply(RoundFinished(round=rnd))
            record.apply(Final(result=trace))
        elif result.status == "failed":
            record.finish("failed", result.error)
        detail = record.detail()
        # The stored status, times, error and graded answer are the run's, not the replay's
        # (a majority vote's answer is no trajectory's: only the run knows it).
        return detail.model_copy(update={
            **summary.model_dump(exclude={"question", "answer"}),
            "error": result.error if result.status == "failed" else detail.error,
            "final_answer": result.extracted if result.extracted is not None else detail.final_answer,
        })  # fmt: skip

    def trace(self, request_id: str) -> dict[str, Any] | None:
        """The stored result with its whole trace (texts and reasoning included), for download."""
        loaded = self._load(request_id)
        if loaded is None:
            return None
        arm, result, problem, _ = loaded
        return {
            "run": str(self.run_dir),
            "arm": arm.name,
            "problem": {
                "id": problem.id,
                "messages": problem.messages,
                "ground_truth": problem.ground_truth,
                "kind": problem.kind,
            },  # fmt: skip
            "seed": result.seed,
            "repeat": result.repeat,
            "status": result.status,
            "answer": result.answer,
            "extracted": result.extracted,
            "correct": result.correct,
            "grade_note": result.grade_note,
            "error": result.error,
            "wall_s": result.wall_s,
            "finished_at": result.updated_at,
            "trace": result.trace.model_dump(mode="json") if result.trace is not None else None,
        }


def create_run_app(run_dir: str | Path) -> FastAPI:
    """The viewer's pages and API over ``run_dir``, read-only (only GET routes)."""
    view = RunView(run_dir)
    app = FastAPI(title=f"pacore view {run_dir}", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui")

    mount_viewer(app)

    @app.get("/ui/api/requests")
    def results() -> dict[str, Any]:
        return {"data": view.summaries(), "source": {"run": str(view.run_dir), "read_only": True}}

    @app.get("/ui/api/requests/{request_id:path}")
    def result_detail(request_id: str) -> RequestDetail:
        detail = view.detail(request_id)
        if detail is None:
            raise HTTPException(404, f"no result {request_id!r} in run {view.run_dir}")
        return detail

    @app.get("/ui/api/traces/{request_id:path}")
    def result_trace(request_id: str) -> dict[str, Any]:
        trace = view.trace(request_id)
        if trace is None:
            raise HTTPException(404, f"no result {request_id!r} in run {view.run_dir}")
        return trace

    return app
