"""The /ui trace viewer in real headless Chromium (Playwright driving Debian's chromium)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import openai
import pytest
from playwright.sync_api import sync_playwright

from fakes import Call, StreamingScriptedBackend
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
    release = threading.Event()

    def wait_in_round_one(call: Call) -> float:
        return 0.0 if "Reference Responses" in call.last_user_text or release.is_set() else 0.6 * (call.number + 1)

    backend = StreamingScriptedBackend(respond=reply, delay=wait_in_round_one)
    with running_app(backend, ServerConfig(schedule=Schedule.parse([4]))) as running:
        worker = threading.Thread(target=ask, args=(running,))
        worker.start()
        page.goto(f"{running.base_url}/ui")
        page.locator(".detail .badge.running").wait_for()
        assert page.locator("text=waiting for the final round").count() == 1
        # Cards appear one by one while the round runs.
        page.locator(".round .card:not(.pending-card)").first.wait_for()
        assert page.locator(".pending-card").count() == 1
        page.locator(".detail .badge.done").wait_for(timeout=15000)
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
