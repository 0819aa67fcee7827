"""The /ui trace viewer in real headless Chromium (Playwright driving Debian's chromium)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator

import openai
import pytest
from playwright.sync_api import sync_playwright

from fakes import Call, StreamingScriptedBackend
from harness import fast_backend  # noqa: E402
from pacore.backends import open_backend
from pacore.backends.base import Completion
from pacore.schedule import Schedule
from pacore.server import ServerConfig
from server_harness import RunningServer, running_app

pytestmark = pytest.mark.http

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
HOSTILE = '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2"> so the answer is 41.'
QUESTION = "What is six times seven?"


def reply(call: Call, i: int) -> str | Completion:
    if "Reference Responses" in call.last_user_text:
        return "Weighing the references, the answer is 42."
    return [
        "Six sevens: 7+7+7+7+7+7 = 42. The answer is 42.",
        HOSTILE,
        Completion(text="", error="HTTP 503 from backend", error_kind="status"),
        "6 x 7 = 42, so the answer is 42.",
    ][call.number % 4]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run 'make browser' (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.dialogs = dialogs
    yield page
    context.close()


def ask(
    running: RunningServer, api_key: str = "unused", question: str = QUESTION, grading: str | None = "math"
) -> openai.types.chat.ChatCompletion:
    """Ask ``question``; with a ``grading`` kind (``pacore.grading``) the viewer extracts answers."""
    client = openai.OpenAI(base_url=running.api_url, api_key=api_key, max_retries=0)
    return client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": question}],
        extra_body={"pacore": {"grading": grading}} if grading else None,
    )  # fmt: skip


def test_viewer_lists_a_finished_request_and_shows_its_rounds(page):
    backend = StreamingScriptedBackend(respond=reply)
    with running_app(backend, ServerConfig(schedule=Schedule.parse([4]))) as running:
        completion = ask(running)
        page.goto(f"{running.base_url}/ui")

        item = page.locator(".request-item", has_text=QUESTION)
        item.wait_for()
        assert "done" in item.locator(".badge").text_content()
        item.click()
        page.wait_for_url(f"**/ui#{completion.id}")

        rounds = page.locator(".round")
        rounds.nth(1).wait_for()
        assert rounds.count() == 2
        first, final = rounds.nth(0), rounds.nth(1)
        assert first.locator(".round-head h3").text_content().startswith("Round 1 of 2")
        assert first.locator(".stats").text_content().startswith("4/4 done · 1 failed · ")
        assert first.locator(".card").count() == 4
        assert "HTTP 503 from backend" in first.locator(".card.failed").text_content()
        # Two of three answers agree with the final one and are highlighted.
        assert first.locator(".card.matches-final").count() == 2
        assert first.locator(".dist-row.winner .label").text_content() == "42"
        assert first.locator(".dist-row.winner .count").text_content() == "2"
        assert final.locator(".card .message").text_content() == "Weighing the references, the answer is 42."
        assert page.locator("#final-answer .extracted").text_content() == "42"
        assert "calls 5 (1 failed)" in page.locator(".meta").text_content()

        # Model text is shown as text: the markup is visible and nothing ran.
        hostile = first.locator(".card", has_text="<script>")
        assert hostile.locator(".message").text_content() == HOSTILE
        assert page.locator(".detail script, .detail img").count() == 0
        assert page.evaluate("window.pwned") is None
        assert page.dialogs == []


def test_a_running_request_updates_live(page):
    # Round 1's first call answers at once, the other three wait until the page has shown it:
    # however slow the browser, the request is still running while it is checked.
    release = threading.Event()
    backend = StreamingScriptedBackend(respond=reply, gate=release, held=lambda call: call.number in (1, 2, 3))
    with running_app(backend, ServerConfig(schedule=Schedule.parse([4]))) as running:
        worker = threading.Thread(target=ask, args=(running,))
        worker.start()
        page.goto(f"{running.base_url}/ui")
        page.locator(".detail .badge.running").wait_for()
        assert page.locator("text=waiting for the final round").count() == 1
        # Cards appear one by one while the round runs.
        page.locator(".round .card:not(.pending-card)").first.wait_for()
        assert page.locator(".pending-card").count() == 1
        release.set()
        page.locator(".detail .badge.done").wait_for(timeout=30000)
        worker.join()
        assert page.locator("#final-answer .extracted").text_content() == "42"
        assert page.locator(".pending-card").count() == 0


def test_viewer_asks_for_the_api_key_when_the_server_has_keys(page):
    backend = StreamingScriptedBackend(respond=reply)
    config = ServerConfig(schedule=Schedule.parse([4]), api_keys=("s3cret",))
    with running_app(backend, config) as running:
        ask(running, api_key="s3cret")
        page.goto(f"{running.base_url}/ui")
        page.locator("#notice", has_text="needs an API key").wait_for()
        assert page.locator(".request-item").count() == 0

        page.fill("#api-key", "s3cret")
        page.click("#key-form button")
        page.locator(".request-item", has_text=QUESTION).wait_for()
        page.locator(".round").nth(1).wait_for()
        assert page.locator("#notice").text_content() == ""


HAIKU = "Write a haiku about the sea."
POEM = "Grey-green under cloud,\nthe sea keeps 1 secret blue:\nthe sky it lends back."


def poem_reply(call: Call, i: int) -> str:
    return POEM if "Reference Responses" in call.last_user_text else f"Draft {i}: 3 waves and 2 gulls."


def test_without_a_grading_kind_the_final_answer_is_the_text_alone(page):
    backend = StreamingScriptedBackend(respond=poem_reply)
    with running_app(backend, ServerConfig(schedule=Schedule.parse([3]))) as running:
        ask(running, question=HAIKU, grading=None)
        page.goto(f"{running.base_url}/ui")
        page.locator("#final-answer").wait_for()
        assert page.locator("#final-answer .answer-text").text_content() == POEM
        # No number pulled out of a poem: no extracted answer, no chips, no vote.
        assert page.locator("#final-answer .extracted, .chip, .dist").count() == 0
        assert "grading" not in page.locator(".meta").text_content()


def test_a_synthesis_card_shows_its_prompt_collapsed_and_on_demand(page):
    backend = StreamingScriptedBackend(respond=reply)
    with running_app(backend, ServerConfig(schedule=Schedule.parse([4]))) as running:
        ask(running)
        page.goto(f"{running.base_url}/ui")
        final = page.locator(".round").nth(1)
        final.locator(".card").first.wait_for()
        assert page.locator(".round").nth(0).locator("details.prompt").count() == 0  # round 1: the question itself
        box = final.locator(".card details.prompt")
        assert box.count() == 1 and box.get_attribute("open") is None
        assert box.locator(".prompt-text").count() == 0  # not even in the page until opened
        box.locator("summary").click()
        sent = next(c.last_user_text for c in backend.calls if "Reference Responses" in c.last_user_text)
        assert box.locator(".prompt-text").text_content() == sent
        assert QUESTION in sent


def test_dates_download_and_filter(page, tmp_path):
    backend = StreamingScriptedBackend(respond=reply)
    with running_app(backend, ServerConfig(schedule=Schedule.parse([4]))) as running:
        first = ask(running)
        ask(running, question="What is the colour of the sky?", grading=None)
        page.goto(f"{running.base_url}/ui")
        page.locator(".request-item").nth(1).wait_for()
        # Local dates: the list and the detail show the request's day, not only its time.
        created = page.evaluate(f"new Date({time.time() * 1000}).toLocaleDateString()")
        assert created in page.locator(".request-item .when").first.text_content()
        page.locator(".meta", has_text="finished").wait_for()
        assert created in page.locator(".meta").text_content()

        page.fill("#filter", "six SEVEN")
        page.wait_for_function("document.querySelectorAll('.request-item').length === 1")
        assert QUESTION in page.locator(".request-item").text_content()
        assert page.locator("#filter-count").text_content() == "1 of 2"
        page.fill("#filter", "no such words")
        page.wait_for_function("document.querySelectorAll('.request-item').length === 0")
        page.fill("#filter", "")
        page.wait_for_function("document.querySelectorAll('.request-item').length === 2")

        page.goto(f"{running.base_url}/ui#{first.id}")
        # Only the hash changes: wait for that request's page, not the one shown before.
        page.locator(".request-head code", has_text=first.id).wait_for()
        page.locator(".round").nth(1).wait_for()
        with page.expect_download() as download:
            page.click("#download")
        saved = tmp_path / "trace.json"
        download.value.save_as(saved)
        trace = json.loads(saved.read_text())
        assert download.value.suggested_filename == f"{first.id}.json"
        assert trace["id"] == first.id and trace["answer"] == "Weighing the references, the answer is 42."
        assert [len(r["trajectories"]) for r in trace["rounds"]] == [4, 1]
        assert page.dialogs == [] and page.locator("#notice").text_content() == ""


def test_pacore_view_shows_a_batch_run_read_only(page, tmp_path):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    from fakes import ScriptedBackend
    from pacore.eval.datasets import Problem
    from pacore.eval.runner import Arm, run_dataset
    from pacore.server.runview import create_run_app
    from server_harness import serving

    def run_reply(call: Call, i: int) -> str:
        if "Reference Responses" in call.last_user_text:
            return "Both references say 2, so the answer is 2." if "1 plus" in call.last_user_text else "It is 5."
        return "The answer is 2" if i == 0 else "I think 3"

    problems = [Problem(id=f"q{n}", messages=[{"role": "user", "content": f"What is {n} plus one?"}],
                        answer=str(n + 1), kind="gsm8k", line=n + 1) for n in (1, 3)]  # fmt: skip
    backend = ScriptedBackend(respond=run_reply, max_n=2)
    run = run_dataset(tmp_path / "run", problems, dataset_path="d.jsonl", arm=Arm.build("pacore", schedule="2"),
                      backend=backend)  # fmt: skip
    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API holds this thread's event loop
        pool.submit(asyncio.run, run).result()
    server = uvicorn.Server(uvicorn.Config(create_run_app(tmp_path / "run"), log_level="warning"))
    with serving(server) as base_url:
        listings: list[str] = []
        page.on("request", lambda r: listings.append(r.url) if r.url.endswith("/ui/api/requests") else None)
        page.goto(f"{base_url}/ui")
        items = page.locator(".request-item")
        items.nth(1).wait_for()
        assert page.locator("#source").text_content() == f"run {tmp_path / 'run'} · read-only"
        assert page.locator("#key-form").is_hidden()
        right = items.filter(has_text="q1 · pacore-2")
        assert right.locator(".badge.correct").text_content() == "correct"
        assert items.filter(has_text="q3 · pacore-2").locator(".badge.wrong").count() == 1

        page.fill("#filter", "wrong")
        page.wait_for_function("document.querySelectorAll('.request-item').length === 1")
        page.fill("#filter", "")
        items.filter(has_text="q3 · pacore-2").click()
        page.locator(".request-head code", has_text="q3 · pacore-2").wait_for()
        page.locator(".round").nth(1).wait_for()
        final = page.locator("#final-answer")
        assert final.locator(".answer-text").text_content() == "It is 5."
        assert final.locator(".extracted").text_content() == "5"
        assert "ground truth 4" in final.locator(".truth").text_content()
        assert final.locator(".truth .badge.wrong").count() == 1
        card = page.locator(".round").nth(1).locator(".card")
        card.locator("summary").click()
        assert "What is 3 plus one?" in card.locator(".prompt-text").text_content()
        assert page.dialogs == []
        page.wait_for_timeout(2500)  # longer than the server list's polling interval
        assert len(listings) == 1  # a run's list is read once, not polled


def test_viewer_shows_what_the_adaptive_policies_did(page):
    """Confidence per trajectory, stopped badges, dropped references and policy notes, on the
    simulated model of bench/fastbackend.py (it returns logprobs)."""
    compute = {
        "keep_top": 0.5, "early_stop": True, "warmup": 2, "warmup_first": True, "window": 16,
        "early_stop_percentile": 90,
    }  # fmt: skip
    with (
        fast_backend("--simulate", "--sim-median-tokens", 60) as simulated,
        running_app(open_backend(simulated.url), ServerConfig(schedule=Schedule.parse([8]))) as running,
    ):
        client = openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0)
        completion = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Problem 7"}], seed=1,
            extra_body={"pacore": {"compute": compute}},
        )  # fmt: skip
        summary = completion.model_extra["pacore"]["compute"]
        page.goto(f"{running.base_url}/ui#{completion.id}")
        rounds = page.locator(".round")
        rounds.nth(1).wait_for()
        first, synthesis = rounds.nth(0), rounds.nth(1)
        first.locator(".card .confidence").first.wait_for()
        assert first.locator(".card .confidence").count() == 8
        assert first.locator(".card .confidence").first.text_content().startswith("confidence ")
        assert first.locator(".badge.stopped").count() == summary["stopped"]["early_stop"] >= 1
        assert first.locator(".policy-note").text_content().startswith("early stop: threshold ")
        assert synthesis.locator(".policy-note").text_content().startswith("keep-top: ")
        assert synthesis.locator(".dropped").text_content().startswith("dropped (least confident): R1#")
        assert f"{summary['dropped']} references dropped by keep-top" in synthesis.locator(".stats").text_content()


def test_pacore_view_shows_an_answer_graded_wrong_without_being_judged(page, tmp_path):
    """The list badges it "not judged" with its grade note as tooltip, the detail says why; a wrong answer
    that was judged stays "wrong"."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    from fakes import ScriptedBackend
    from pacore.eval.datasets import Problem
    from pacore.eval.runner import Arm, run_dataset
    from pacore.server.runview import create_run_app
    from server_harness import serving

    replies = {"heavy": r"So \boxed{9^{9^{9}}}", "judged": "The answer is 7"}
    problems = [
        Problem(id=name, messages=[{"role": "user", "content": f"Problem {name}"}], answer="5", kind="math", line=n)
        for n, name in enumerate(replies, 1)
    ]  # fmt: skip
    backend = ScriptedBackend(respond=lambda call, i: replies[call.last_user_text.split()[-1]])
    run = run_dataset(tmp_path / "run", problems, dataset_path="d.jsonl", arm=Arm.build("single"), backend=backend)
    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API holds this thread's event loop
        pool.submit(asyncio.run, run).result()
    note = "answer too heavy to compare symbolically"
    server = uvicorn.Server(uvicorn.Config(create_run_app(tmp_path / "run"), log_level="warning"))
    with serving(server) as base_url:
        page.goto(f"{base_url}/ui")
        items = page.locator(".request-item")
        items.nth(1).wait_for()
        heavy, judged = items.filter(has_text="heavy · single"), items.filter(has_text="judged · single")
        badge = heavy.locator(".badge.wrong")
        assert badge.text_content() == "not judged"
        assert badge.get_attribute("title") == f"graded wrong without being judged: {note}"
        assert judged.locator(".badge.wrong").text_content() == "wrong"
        assert judged.locator(".badge.wrong").get_attribute("title") is None

        page.fill("#filter", "not judged")
        page.wait_for_function("document.querySelectorAll('.request-item').length === 1")
        assert "heavy · single" in items.first.text_content()
        page.fill("#filter", "")
        heavy.click()
        page.locator(".request-head code", has_text="heavy · single").wait_for()
        assert page.locator(".request-head .badge.not-judged").text_content() == "not judged"
        final = page.locator("#final-answer")
        assert final.locator(".truth .badge.not-judged").get_attribute("title").endswith(note)
        assert final.locator(".grade-note").text_content() == (
            f"Not judged: {note}. Graded wrong: the answers could not be compared."
        )
        judged.click()
        page.locator(".request-head code", has_text="judged · single").wait_for()
        page.locator("#final-answer .truth .badge.wrong", has_text="wrong").wait_for()
        assert page.locator("#final-answer .grade-note, .badge.not-judged").count() == 1  # the list's only
        assert page.dialogs == []
