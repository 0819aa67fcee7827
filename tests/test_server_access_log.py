"""``pacore serve`` logs one line per chat completion request, and gives absolute trace URLs it can vouch for.

The line has the request's id, schedule, status, tokens and time; never a
key, and the question and answer only with ``--log-content``. A trace URL is
built from the address the server listens on or from ``--public-url``, never
from a client's Host header.
"""

from __future__ import annotations

import signal

import httpx
import openai
import pytest

from harness import fast_backend
from server_harness import running_cli

pytestmark = pytest.mark.http

KEY = "sk-access-log-test-key-0123456789"
QUESTION = "What is the secret colour of the sky?"


def serve_and_ask(monkeypatch, *options: str, host_header: str | None = None) -> tuple[str, object, str]:
    """``(base_url, completion, stderr)`` of the real command asked one good and one bad request."""
    monkeypatch.setenv("PACORE_SERVER_API_KEYS", KEY)
    with (
        fast_backend("--completion-tokens", 4) as upstream,
        running_cli("--backend", upstream.urls[0], "--schedule", "2", *options) as (running, process),
    ):
        headers = {"Host": host_header} if host_header else None
        client = openai.OpenAI(base_url=running.api_url, api_key=KEY, max_retries=0, default_headers=headers)
        completion = client.chat.completions.create(
            model="pacore-2/fast", messages=[{"role": "user", "content": QUESTION}]
        )
        refused = httpx.post(f"{running.api_url}/chat/completions", json={"model": "m"},
                             headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert refused.status_code == 400
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    return running.base_url, completion, err


def access_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(("pacore serve: 200 ", "pacore serve: 400 "))]


def test_one_line_per_request_with_id_schedule_status_tokens_and_time_but_no_content(monkeypatch):
    base_url, completion, err = serve_and_ask(monkeypatch, host_header="evil.example")
    answered, refused = access_lines(err)
    assert answered.startswith(f"pacore serve: 200 {completion.id} model=pacore-2/fast schedule=2 ")
    assert f" tokens={completion.usage.total_tokens} " in answered and answered.endswith("s")
    assert refused.startswith("pacore serve: 400 - ")
    assert QUESTION not in err and completion.choices[0].message.content not in err and KEY not in err
    # Absolute, from the address listened on: the Host header the client sent is not used.
    assert completion.model_extra["pacore"]["trace_url"] == f"{base_url}/ui#{completion.id}"


def test_log_content_quotes_the_question_and_public_url_makes_the_trace_url(monkeypatch):
    _, completion, err = serve_and_ask(monkeypatch, "--log-content", "--public-url", "https://pacore.example/")
    (answered,) = [line for line in access_lines(err) if " 200 " in line]
    assert f'question="{QUESTION}"' in answered and " answer=" in answered
    assert KEY not in err
    assert completion.model_extra["pacore"]["trace_url"] == f"https://pacore.example/ui#{completion.id}"
