"""The trace viewer's API: answers as text unless a grading kind applies, the exact synthesis
prompt of each round, dates, the trace download, and ``pacore view`` over a batch run."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from fakes import Call, ScriptedBackend, StreamingScriptedBackend, fail
from pacore.eval.datasets import Problem
from pacore.eval.runner import Arm, run_dataset
from pacore.schedule import Schedule
from pacore.server import ServerConfig
from pacore.server.runview import create_run_app, parse_result_id
from pacore.trace import Final, RoundFinished, RoundStarted, TrajectoryFinished
from server_harness import PACORE, RunningServer, running_app, serving

pytestmark = pytest.mark.http

HAIKU = "Write a haiku about the colour of the sea."
POEM = "Grey-green under cloud,\nthe sea keeps 1 secret blue:\nthe sky it lends back."


def reply(call: Call, i: int) -> str:
    if "Reference Responses" in call.last_user_text:
        return POEM
    return [f"Draft {call.number}.{i}: blue 1 waves, 2 gulls, 3 stones.", f"Sea {i}: 7 tides at dusk."][i % 2]


def ask(running: RunningServer, question: str, **pacore: object) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0)
    return client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": question}],
        extra_body={"pacore": pacore} if pacore else None,
    )  # fmt: skip


def get(running: RunningServer, path: str) -> dict:
    response = httpx.get(f"{running.base_url}{path}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def fake() -> StreamingScriptedBackend:
    return StreamingScriptedBackend(respond=reply, max_n=4)


@pytest.fixture
def server(fake) -> Iterator[RunningServer]:
    with running_app(fake, ServerConfig(schedule=Schedule.parse([4, 2]))) as running:
        yield running


def test_without_a_grading_kind_the_answer_is_the_text_and_nothing_is_extracted(server) -> None:
    completion = ask(server, HAIKU)
    detail = get(server, f"/ui/api/requests/{completion.id}")
    assert detail["answer"] == POEM and detail["kind"] is None
    # Numbers in a poem are not its answer: nothing extracted, no votes.
    assert detail["final_answer"] is None
    assert all(t["answer"] is None for r in detail["rounds"] for t in r["trajectories"])
    assert all(r["distribution"] == [] for r in detail["rounds"])


def test_a_grading_kind_extracts_answers_and_votes(server) -> None:
    completion = ask(server, HAIKU, grading="number")
    detail = get(server, f"/ui/api/requests/{completion.id}")
    assert detail["kind"] == "number" and detail["final_answer"] == "1"
    first = detail["rounds"][0]
    assert sorted(t["answer"] for t in first["trajectories"]) == ["3", "3", "7", "7"]
    assert sorted((d["answer"], d["count"]) for d in first["distribution"]) == [("3", 2), ("7", 2)]
    assert get(server, "/ui/api/requests")["data"][0]["kind"] == "number"


def test_an_unknown_grading_kind_is_a_400(server) -> None:
    response = httpx.post(f"{server.api_url}/chat/completions", json={
        "model": "scripted", "messages": [{"role": "user", "content": "hi"}], "pacore": {"grading": "vibes"},
    })  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "grading" in response.json()["error"]["message"]


def test_each_synthesis_round_carries_the_exact_prompt_its_calls_received(server, fake) -> None:
    completion = ask(server, HAIKU)
    detail = get(server, f"/ui/api/requests/{completion.id}")
    rounds = detail["rounds"]
    assert rounds[0]["prompt"] is None  # round 1 is sent the conversation itself
    prompts = {call.last_user_text for call in fake.calls if "Reference Responses" in call.last_user_text}
    # Each round's prompt is byte for byte what its calls got: round 2 shows 4 references, the final round 2.
    assert {rounds[1]["prompt"], rounds[2]["prompt"]} == prompts and len(prompts) == 2
    assert "Reference 4:" in rounds[1]["prompt"] and "Reference 3:" not in rounds[2]["prompt"]
    assert HAIKU in rounds[2]["prompt"]
    # Sent once: a poll with the last sequence number seen does not repeat it.
    again = get(server, f"/ui/api/requests/{completion.id}?since={detail['seq']}")
    assert [r["prompt"] for r in again["rounds"]] == [None, None, None]


def test_requests_have_start_and_finish_dates(server) -> None:
    before = time.time()
    completion = ask(server, HAIKU)
    after = time.time()
    (summary,) = get(server, "/ui/api/requests")["data"]
    assert before - 1 <= summary["created"] <= summary["finished"] <= after + 1
    detail = get(server, f"/ui/api/requests/{completion.id}")
    assert detail["finished"] == summary["finished"]


def test_the_trace_download_is_the_whole_kept_trace(server) -> None:
    completion = ask(server, HAIKU)
    trace = get(server, f"/ui/api/traces/{completion.id}")
    assert trace["id"] == completion.id and trace["answer"] == POEM
    assert [len(r["trajectories"]) for r in trace["rounds"]] == [4, 2, 1]
    assert trace["rounds"][1]["prompt"]  # the prompt too, whatever was polled before
    assert httpx.get(f"{server.base_url}/ui/api/traces/chatcmpl-nope").status_code == 404


# --- pacore view RUN_DIR ---------------------------------------------------------------------

FAILING = 2


def run_reply(call: Call, i: int):
    number = int(re.search(r"Problem (\d+)", call.last_user_text).group(1))
    if number == FAILING:
        return fail("status", "upstream said no")
    if "Reference Responses" in call.last_user_text:
        return f"Checked both references: the answer is {number + 1}." if number else "The answer is 9."
    return f"The answer is {number + 1}" if i % 2 == 0 else f"Maybe {number + 5}"


PROBLEMS = [
    Problem(
        id=f"set/q{n}",
        messages=[{"role": "user", "content": f"Problem {n}: what is {n} plus one?"}],
        answer=str(n + 1),
        kind="gsm8k",
        line=n + 1,
    )  # fmt: skip
    for n in range(3)
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ScriptedBackend]:
    path = tmp_path_factory.mktemp("view") / "run"
    backend = ScriptedBackend(respond=run_reply, max_n=2)

    async def arms() -> None:
        pacore = Arm.build("pacore", schedule="2")
        await run_dataset(path, PROBLEMS, dataset_path="d.jsonl", arm=pacore, backend=backend)
        await run_dataset(path, PROBLEMS, dataset_path="d.jsonl", arm=Arm.build("single"), backend=backend,
                          add_arm=True, repeats=2)  # fmt: skip

    asyncio.run(arms())
    return path, backend


@pytest.fixture(scope="module")
def viewer(run_dir) -> Iterator[RunningServer]:
    server = uvicorn.Server(uvicorn.Config(create_run_app(run_dir[0]), log_level="warning"))
    with serving(server) as base_url:
        yield RunningServer(base_url)


def test_a_run_lists_every_result_with_status_answer_and_grade(viewer, run_dir) -> None:
    body = get(viewer, "/ui/api/requests")
    assert body["source"] == {"run": str(run_dir[0]), "read_only": True}
    rows = {r["id"]: r for r in body["data"]}
    assert len(rows) == 3 + 3 * 2
    q0 = rows["pacore-2/set/q0/0/0"]
    assert (q0["status"], q0["answer"], q0["correct"], q0["ground_truth"], q0["kind"]) == (
        "done", "The answer is 9.", False, "1", "gsm8k",
    )  # fmt: skip
    assert (q0["title"], q0["schedule"]) == ("set/q0 · pacore-2", [2])
    q1 = rows["pacore-2/set/q1/0/0"]
    assert (q1["status"], q1["correct"], q1["answer"]) == ("done", True, "Checked both references: the answer is 2.")
    failed = rows["pacore-2/set/q2/0/0"]
    assert (failed["status"], failed["correct"]) == ("failed", None)
    assert rows["single/set/q1/0/1"]["title"] == "set/q1 · single · seed 0 repeat 1"
    assert all(r["created"] <= r["finished"] for r in rows.values())


def test_a_run_result_shows_its_rounds_prompt_grade_and_error(viewer, run_dir) -> None:
    detail = get(viewer, "/ui/api/requests/pacore-2/set/q1/0/0")
    assert detail["question"] == "Problem 1: what is 1 plus one?"
    assert (detail["final_answer"], detail["ground_truth"], detail["correct"]) == ("2", "2", True)
    first, final = detail["rounds"]
    assert sorted(t["answer"] for t in first["trajectories"]) == ["2", "6"]
    synthesis_calls = {c.last_user_text for c in run_dir[1].calls if "Reference Responses" in c.last_user_text}
    assert final["prompt"] in synthesis_calls and "Problem 1:" in final["prompt"]
    single = get(viewer, "/ui/api/requests/single/set/q1/0/1")
    assert (single["final_answer"], single["title"]) == ("2", "set/q1 · single · seed 0 repeat 1")
    failed = get(viewer, "/ui/api/requests/pacore-2/set/q2/0/0")
    assert failed["status"] == "failed" and "upstream said no" in failed["error"]
    trace = get(viewer, "/ui/api/traces/pacore-2/set/q1/0/0")
    assert (trace["arm"], trace["problem"]["id"], trace["correct"]) == ("pacore-2", "set/q1", True)
    assert trace["trace"]["rounds"][0]["trajectories"][0]["text"]  # the full texts, not only messages
    for missing in ("pacore-2/set/q9/0/0", "nope", "other-arm/set/q1/0/0"):
        assert httpx.get(f"{viewer.base_url}/ui/api/requests/{missing}").status_code == 404


def test_the_run_viewer_is_read_only(viewer, run_dir) -> None:
    before = (run_dir[0] / "run.sqlite").read_bytes()
    assert httpx.post(f"{viewer.base_url}/ui/api/requests", json={}).status_code == 405
    assert httpx.delete(f"{viewer.base_url}/ui/api/requests/pacore-2/set/q1/0/0").status_code == 405
    page = httpx.get(f"{viewer.base_url}/ui")
    assert "script-src" not in page.headers["content-security-policy"]  # only 'self': no inline script
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert (run_dir[0] / "run.sqlite").read_bytes() == before


def test_a_run_lists_the_start_of_long_questions_and_answers_as_live_requests_do(tmp_path) -> None:
    from pacore.server.history import RequestRecord
    from pacore.server.runview import RunView

    question = "Problem 7:   a long\nquestion. " * 30
    answer = "A long answer," + " and a long answer," * 30
    problem = Problem(id="q7", messages=[{"role": "user", "content": question}], answer="8", kind="exact", line=1)
    backend = ScriptedBackend(respond=lambda call, i: answer)
    asyncio.run(run_dataset(tmp_path / "run", [problem], dataset_path="d.jsonl", arm=Arm.build("single"),
                            backend=backend))  # fmt: skip
    view = RunView(tmp_path / "run")
    (summary,) = view.summaries()
    live = RequestRecord("r", "m", [], [{"role": "user", "content": question}], False).summary()
    assert summary.question == live.question and len(summary.question) == 240 and summary.question.endswith("…")
    assert summary.answer == answer[:239] + "…"
    detail = view.detail(summary.id)
    assert detail is not None and (detail.question, detail.answer) == (question, answer)


def test_result_ids_round_trip_through_problem_ids_with_slashes() -> None:
    assert parse_result_id("pacore-32,4/a/b/c/3/12") == ("pacore-32,4", "a/b/c", 3, 12)
    assert parse_result_id("single/q/x/1") is None


def test_pacore_view_command_serves_the_run_and_refuses_a_non_run(run_dir, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PACORE_DEBUG"}
    refused = subprocess.run([PACORE, "view", str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2 and refused.stderr.startswith("pacore: error: ")
    assert len(refused.stderr.strip().splitlines()) == 1
    # As a context manager Popen closes its pipes once the process is reaped (else ResourceWarnings).
    with subprocess.Popen([PACORE, "view", str(run_dir[0]), "--port", "0"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env) as process:  # fmt: skip
        try:
            line = process.stdout.readline()
            url = re.search(r"(http://\S+)/ui", line).group(1)
            assert "(read-only)" in line
            listing = httpx.get(f"{url}/ui/api/requests", timeout=30).json()["data"]
            assert len(listing) == 9
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_a_prompt_too_long_to_keep_is_left_out_not_cut() -> None:
    from pacore.prompts import SynthesisTemplate
    from pacore.server.history import _PROMPT_CHARS, RequestRecord
    from pacore.trace import Result, Round, Trajectory, Usage

    def replay(question: str) -> list[str | None]:
        record = RequestRecord("r", "m", [2], [{"role": "user", "content": question}], False,
                               template=SynthesisTemplate.default())  # fmt: skip
        first = Round(index=0, k=2, trajectories=[Trajectory(round=0, index=i, message=f"m{i}") for i in range(2)])
        final = Round(index=1, k=1, final=True, references=[(0, 1), (0, 0)],
                      trajectories=[Trajectory(round=1, index=0, message="done")])  # fmt: skip
        for rnd in (first, final):
            record.apply(RoundStarted(round=rnd.index, k=rnd.k, final=rnd.final, total_rounds=2))
            for t in rnd.trajectories:
                record.apply(TrajectoryFinished(round=rnd.index, trajectory=t, done=1, k=rnd.k))
            record.apply(RoundFinished(round=rnd))
        record.apply(Final(result=Result(answer="done", schedule=[2], rounds=[first, final], usage=Usage())))
        assert record.problem == ""  # not kept once every prompt is built
        return [r.prompt for r in record.detail().rounds]

    short = replay("Why is the sea blue?")
    assert short[0] is None and short[1] == SynthesisTemplate.default().render(
        problem="Why is the sea blue?", references=["m1", "m0"], round=2, total_rounds=2
    )
    assert replay("x" * (_PROMPT_CHARS + 1)) == [None, None]


def test_a_summary_shows_the_start_of_the_question_and_answer_and_the_detail_shows_them_whole() -> None:
    from pacore.server.history import RequestRecord, RequestSummary
    from pacore.trace import Result, Round, Trajectory, Usage

    question = "Why  is the sea blue?\n" * 40
    record = RequestRecord("r", "m", [], [{"role": "user", "content": question}], True)
    first = record.summary().elapsed_s
    time.sleep(0.01)
    running = record.summary()
    assert running.status == "running" and running.finished is None and running.answer is None
    assert running.elapsed_s > first  # counted live while the request runs
    assert len(running.question) == 240 and running.question.startswith("Why is the sea blue? Why")
    assert running.question.endswith("…") and record.detail().question == question

    rnd = Round(index=0, k=1, final=True, trajectories=[Trajectory(round=0, index=0, completion_tokens=7)])
    record.apply(RoundStarted(round=0, k=1, final=True, total_rounds=1))
    record.apply(TrajectoryFinished(round=0, trajectory=rnd.trajectories[0], done=1, k=1))
    answer = "The sea is blue because " + "water absorbs red light; " * 20
    record.apply(Final(result=Result(answer=answer, schedule=[], rounds=[rnd], usage=Usage(), elapsed_s=1.5)))
    summary, detail = record.summary(), record.detail()
    assert summary.status == "done" and summary.elapsed_s == 1.5 and summary.completion_tokens == 7
    assert summary.answer == answer[:239] + "…" and detail.answer == answer and detail.question == question
    # Every other field of the summary is the detail's.
    shared = set(RequestSummary.model_fields) - {"question", "answer"}
    assert summary.model_dump(include=shared) == detail.model_dump(include=shared)


def test_looking_at_a_record_does_not_walk_its_answer_or_trajectories_again(monkeypatch) -> None:
    """The viewer polls the list and a detail every second: each look costs the same however long the request."""
    from pacore.server import history
    from pacore.trace import Result, Round, Trajectory, Usage

    record = history.RequestRecord("r", "m", [2], [{"role": "user", "content": "q"}], False)
    first = Round(index=0, k=2, trajectories=[
        Trajectory(round=0, index=0, prompt_tokens=3, completion_tokens=5),
        Trajectory(round=0, index=1, prompt_tokens=3, completion_tokens=1, error="reset"),
    ])  # fmt: skip
    final = Round(index=1, k=1, final=True, trajectories=[Trajectory(round=1, index=0, completion_tokens=7)])
    for rnd in (first, final):
        record.apply(RoundStarted(round=rnd.index, k=rnd.k, final=rnd.final, total_rounds=2))
        for t in rnd.trajectories:
            record.apply(TrajectoryFinished(round=rnd.index, trajectory=t, done=1, k=rnd.k))
        record.apply(RoundFinished(round=rnd))
    answer = "The   answer\nis 42. " * 1000
    record.apply(Final(result=Result(answer=answer, schedule=[2], rounds=[first, final], usage=Usage())))

    looks = {"previews": 0, "trajectories": 0}
    preview, ok = history.preview, Trajectory.ok

    def counted_preview(text: str) -> str:
        looks["previews"] += text == answer
        return preview(text)

    def counted_ok(trajectory: Trajectory) -> bool:
        looks["trajectories"] += 1
        return ok.fget(trajectory)  # type: ignore[attr-defined]

    monkeypatch.setattr(history, "preview", counted_preview)
    monkeypatch.setattr(Trajectory, "ok", property(counted_ok))
    summaries = [record.summary() for _ in range(3)]
    assert looks == {"previews": 0, "trajectories": 0}
    detail = record.detail()
    assert looks == {"previews": 0, "trajectories": 3}  # once each, for its round's count of failures
    assert summaries[0] == summaries[2] and summaries[0].answer == " ".join(answer.split())[:239] + "…"
    assert summaries[0].completion_tokens == 13 and detail.completion_tokens == 13
    assert detail.usage == Usage(prompt_tokens=6, completion_tokens=13, calls=3, failed_calls=1)
    detail.usage.calls = 99  # what was served is not the record's own count
    assert record.detail().usage.calls == 3


def test_pacore_view_serves_the_viewer_files_with_the_viewer_csp(viewer) -> None:
    for path in ("/ui", "/ui/", "/ui/static/viewer.js", "/ui/static/viewer.css", "/ui/static/index.html"):
        response = httpx.get(f"{viewer.base_url}{path}", timeout=30)
        assert response.status_code == 200, path
        assert "default-src 'self'" in response.headers["content-security-policy"], path


def test_a_run_result_graded_wrong_without_being_judged_carries_its_grade_note(tmp_path) -> None:
    """The run's grade note reaches the list, the detail and the download; a live request has none."""
    from pacore.server.history import RequestRecord, RequestSummary
    from pacore.server.runview import RunView

    replies = {"heavy": r"So \boxed{9^{9^{9}}}", "wrong": "The answer is 7", "right": "The answer is 4"}
    problems = [
        Problem(id=name, messages=[{"role": "user", "content": f"Problem {name}"}], answer=answer, kind=kind, line=n)
        for n, (name, answer, kind) in enumerate([("heavy", "5", "math"), ("wrong", "4", "gsm8k"),
                                                  ("right", "4", "gsm8k")], 1)
    ]  # fmt: skip
    backend = ScriptedBackend(respond=lambda call, i: replies[call.last_user_text.split()[-1]])
    asyncio.run(run_dataset(tmp_path / "run", problems, dataset_path="d.jsonl", arm=Arm.build("single"),
                            backend=backend))  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(create_run_app(tmp_path / "run"), log_level="warning"))
    with serving(server) as base_url:
        running = RunningServer(base_url)
        rows = {r["title"]: r for r in get(running, "/ui/api/requests")["data"]}
        note = "answer too heavy to compare symbolically"
        assert {title: (r["correct"], r["grade_note"]) for title, r in rows.items()} == {
            "heavy · single": (False, note), "wrong · single": (False, None), "right · single": (True, None),
        }  # fmt: skip
        detail = get(running, "/ui/api/requests/single/heavy/0/0")
        assert (detail["correct"], detail["grade_note"], detail["final_answer"]) == (False, note, "9^{9^{9}}")
        assert get(running, "/ui/api/requests/single/wrong/0/0")["grade_note"] is None
        assert get(running, "/ui/api/traces/single/heavy/0/0")["grade_note"] == note
    assert RunView(tmp_path / "run").detail("single/heavy/0/0").grade_note == note  # type: ignore[union-attr]
    # A live request has no grade note, and a request saved before the field existed still loads.
    live = RequestRecord("r", "m", [], [{"role": "user", "content": "q"}], False)
    assert live.summary().grade_note is None and live.detail().grade_note is None
    saved = live.summary().model_dump(exclude={"grade_note"})
    assert RequestSummary.model_validate(saved).grade_note is None
