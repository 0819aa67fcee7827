"""Security of the server: keys, templates, the viewer, the address it listens on.

- API keys are compared in constant time, and neither the server's keys nor
  the key pacore sends to its backend ever shows in a response, the /ui
  data, /metrics, the logs (the real command's output and every Python log
  record down to DEBUG) or a run's database, even when the upstream echoes
  the key back in its errors;
- synthesis templates run in jinja2's sandbox, from ``pacore serve
  --template`` as from the engine;
- model output is text in the /ui viewer (real Chromium): markup in a
  question, a trajectory, an error or the answer never becomes an element;
- the server listens on loopback unless told otherwise, and says so.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fakes import Call, StreamingScriptedBackend
from pacore import asolve
from pacore.backends.base import Completion, RetryPolicy
from pacore.backends.openai_http import OpenAIBackend
from pacore.errors import TemplateError
from pacore.prompts import SynthesisTemplate
from pacore.schedule import Schedule
from pacore.server import ServerConfig
from server_harness import PACORE, running_app, running_cli, serving
from test_ui import browser, page  # noqa: F401 - fixtures: one headless Chromium per module

pytestmark = pytest.mark.http

SERVER_KEY = f"sk-server-{secrets.token_hex(12)}"
BACKEND_KEY = f"sk-backend-{secrets.token_hex(12)}"
#: A wrong key a client might send: it may be a real key elsewhere, so it is not echoed either.
NEAR_MISS = SERVER_KEY[:-4] + "zzzz"
SECRETS = (SERVER_KEY, BACKEND_KEY, NEAR_MISS)
#: Questions naming how the upstream misbehaves; each echoes the key it was sent.
ECHOES = ("echo-401", "echo-500", "echo-400", "echo-malformed", "echo-stream")


# --- a hostile upstream ----------------------------------------------------------------


class Upstream:
    """An OpenAI-compatible server that echoes the caller's key in its errors."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> Response:
        authorization = request.headers.get("authorization", "")
        self.authorizations.append(authorization)
        key = authorization.removeprefix("Bearer ")
        if key != BACKEND_KEY:
            return JSONResponse({"error": {"message": "no such key"}}, status_code=401)
        body = await request.json()
        question = body["messages"][-1]["content"]
        if "echo-401" in question:
            return JSONResponse({"error": {"message": f"Incorrect API key provided: {key}"}}, status_code=401)
        if "echo-500" in question:
            return PlainTextResponse(f"upstream crashed while serving {key}", status_code=500)
        if "echo-400" in question:
            return JSONResponse({"error": {"message": f"bad request from {key}"}}, status_code=400)
        if "echo-malformed" in question:
            return JSONResponse({"object": "chat.completion", "note": f"no choices for {key}"})
        if body.get("stream"):
            return StreamingResponse(self.events(key, "echo-stream" in question), media_type="text/event-stream")
        choices = [
            {"index": i, "message": {"role": "assistant", "content": "The answer is 42."}, "finish_reason": "stop"}
            for i in range(body.get("n", 1))
        ]
        usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        return JSONResponse({"id": "x", "object": "chat.completion", "model": "m", "choices": choices, "usage": usage})

    @staticmethod
    async def events(key: str, fail: bool) -> Iterator[str]:
        chunk = {"id": "x", "object": "chat.completion.chunk", "model": "m"}
        yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': {'content': 'The answer '}}]})}\n\n"
        if fail:
            yield f"data: {json.dumps({'error': {'message': f'stream failed for {key}'}})}\n\n"
            return
        done = {"index": 0, "delta": {"content": "is 42."}, "finish_reason": "stop"}
        yield f"data: {json.dumps({**chunk, 'choices': [done]})}\n\n"
        yield "data: [DONE]\n\n"


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, Upstream]]:
    hostile = Upstream()
    with serving(uvicorn.Server(uvicorn.Config(hostile.app, log_level="warning", access_log=False))) as url:
        yield f"{url}/v1", hostile


def exercise(base_url: str) -> list[str]:
    """Every kind of request a key could leak through; what came back (bodies and headers)."""
    seen: list[str] = []
    good = {"Authorization": f"Bearer {SERVER_KEY}"}
    with httpx.Client(base_url=base_url, timeout=60) as http:

        def keep(response: httpx.Response) -> httpx.Response:
            seen.extend([response.text, str(response.headers)])
            return response

        for question in ("What is 6 x 7?", *ECHOES):
            for stream in (False, True):
                body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": question}]}
                keep(http.post("/v1/chat/completions", json=body, headers=good))
        assert keep(http.get("/v1/models", headers={"Authorization": f"Bearer {NEAR_MISS}"})).status_code == 401
        assert keep(http.get("/v1/models", headers={"Authorization": NEAR_MISS})).status_code == 401
        assert keep(http.get("/v1/models")).status_code == 401
        assert keep(http.post("/v1/chat/completions", content=b"{", headers=good)).status_code == 400
        requests = keep(http.get("/ui/api/requests", headers=good)).json()["data"]
        assert len(requests) == 2 * (1 + len(ECHOES))
        for request in requests:
            keep(http.get(f"/ui/api/requests/{request['id']}", headers=good))
        for path in ("/metrics", "/v1/models", "/openapi.json", "/health"):
            assert keep(http.get(path, headers=good)).status_code == 200
    return seen


def assert_no_secret(texts: list[str]) -> None:
    for secret in SECRETS:
        for text in texts:
            at = text.find(secret)
            assert at < 0, f"{secret[:12]}... leaked in: ...{text[max(0, at - 150) : at + 50]}"


def test_keys_leak_nowhere_from_the_real_command(upstream, monkeypatch):
    url, hostile = upstream
    monkeypatch.setenv("PACORE_SERVER_API_KEYS", SERVER_KEY)
    monkeypatch.setenv("PACORE_API_KEY", BACKEND_KEY)
    with running_cli("--backend", url, "--model", "m", "--schedule", "2", "--retries", "0") as (server, process):
        seen = exercise(server.base_url)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0
    assert server.start_line.endswith("· 1 API key")
    assert_no_secret([*seen, server.start_line, out, err])
    # Not vacuous: the key reached the upstream, which echoed it, and pacore redacted it.
    assert set(hostile.authorizations) == {f"Bearer {BACKEND_KEY}"}
    answered = "\n".join(seen)
    assert "Incorrect API key provided: ***" in answered
    assert "upstream crashed while serving ***" in answered
    assert "stream failed for ***" in answered
    assert "bad request from ***" in answered


def test_keys_leak_into_no_log_record(upstream, caplog):
    url, _ = upstream
    caplog.set_level(logging.DEBUG)
    retry = RetryPolicy(max_attempts=2, backoff_base=0.01)
    backend = OpenAIBackend(url, model="m", api_key=BACKEND_KEY, retry=retry)
    config = ServerConfig(schedule=Schedule.parse([2]), api_keys=(SERVER_KEY,))
    with running_app(backend, config) as running:
        seen = exercise(running.base_url)
    records = [f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records]
    assert_no_secret([*seen, caplog.text, *records])
    # Not vacuous: the HTTP client and the retries did log, with the echoes redacted.
    assert any(r.name == "httpx" for r in caplog.records)
    assert any("retry" in r.getMessage() and "***" in r.getMessage() for r in caplog.records)


def test_the_run_database_and_output_hold_no_key(upstream, tmp_path, monkeypatch):
    url, hostile = upstream
    data = tmp_path / "questions.jsonl"
    questions = [
        "What is 6 x 7?",
        "echo-500 What is 6 x 7?",
        "echo-malformed What is 6 x 7?",
        "echo-401 What is 6 x 7?",
    ]
    data.write_text("".join(json.dumps({"question": q, "answer": "42"}) + "\n" for q in questions))
    monkeypatch.setenv("PACORE_API_KEY", BACKEND_KEY)
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [PACORE, "run", str(data), "--out", str(run_dir), "--schedule", "1", "-b", url, "-m", "m",
         "--retries", "0", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    stored = [path.read_bytes() for path in run_dir.rglob("*") if path.is_file()]
    assert stored, "the run wrote nothing"
    for secret in SECRETS:
        assert not any(secret.encode() in blob for blob in stored), f"{secret[:12]}... is in the run directory"
    assert_no_secret([done.stdout, done.stderr])
    # Not vacuous: the failures were recorded, with the echoed key redacted.
    assert any(b"upstream crashed while serving ***" in blob for blob in stored)
    assert f"Bearer {BACKEND_KEY}" in hostile.authorizations


# --- key comparison -------------------------------------------------------------------------


def test_keys_are_compared_in_constant_time_every_one(monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr("pacore.server.app.hmac.compare_digest", spy)
    config = ServerConfig(schedule=Schedule.parse([1]), api_keys=("short", "a-much-longer-second-key"))
    with running_app(StreamingScriptedBackend(), config) as running:
        for token, status in (("short", 200), ("a-much-longer-second-key", 200), ("x" * 200, 401), ("shorT", 401)):
            compared.clear()
            response = httpx.get(f"{running.api_url}/models", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == status
            # Both keys compared whatever matched, as digests of one length (no length leak either).
            assert len(compared) == 2
            assert {len(a) for pair in compared for a in pair} == {32}


# --- templates --------------------------------------------------------------------------------

ESCAPE = "{{ problem.__class__.__mro__[1].__subclasses__() }}"
#: Harmless in the round a template is tried with (2), an escape attempt from round 3 on.
ROUND_GATED = f"{{% if round > 2 %}}{ESCAPE}{{% endif %}}Problem: {{{{ problem }}}} {{{{ references | join(' ') }}}}"


def test_serve_refuses_a_template_that_leaves_the_sandbox(tmp_path):
    template = tmp_path / "evil.j2"
    template.write_text(f"{ESCAPE}\n{{% for r in references %}}{{{{ r }}}}{{% endfor %}}")
    done = subprocess.run(
        [PACORE, "serve", "--port", "0", "--template", str(template), "-b", "http://127.0.0.1:9/v1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "unsafe" in done.stderr and "__class__" in done.stderr


def test_a_template_escape_in_a_later_round_is_blocked_and_reported_as_a_server_error():
    backend = StreamingScriptedBackend()
    config = ServerConfig(schedule=Schedule.parse([2]), template=SynthesisTemplate(ROUND_GATED, origin="evil.j2"))
    with running_app(backend, config) as running:
        client = openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="pacore-2,2/m", messages=[{"role": "user", "content": "Why?"}])
    assert caught.value.status_code == 500
    assert caught.value.body["code"] == "template_error"
    assert "unsafe" in caught.value.body["message"]
    # Rounds 1 and 2 ran; the escaping render never reached the model.
    assert len(backend.calls) == 4
    assert not any("subclasses" in str(call.messages) or "<class" in str(call.messages) for call in backend.calls)


async def test_the_engine_blocks_a_template_escape_in_a_later_round():
    backend = StreamingScriptedBackend()
    with pytest.raises(TemplateError, match="unsafe") as caught:
        await asolve("Why?", schedule=[1, 1], backend=backend, template=SynthesisTemplate(ROUND_GATED))
    # Stopped before the third round's call; the two rounds done are kept.
    assert len(backend.calls) == 2
    assert [r.index for r in caught.value.result.rounds] == [0, 1]


# --- the viewer ---------------------------------------------------------------------------------

HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"><i class="pwned">x</i>'


def hostile_reply(call: Call, i: int) -> str | Completion:
    if "Reference Responses" in call.last_user_text:
        return f"{HOSTILE} so the answer is \\boxed{{{HOSTILE}}}"
    if call.number == 1:
        return Completion(text="", error=f"HTTP 503 {HOSTILE}", error_kind="status")
    return f"{HOSTILE} the answer is 42"


def test_markup_anywhere_in_a_request_shows_as_text_in_the_viewer(page):  # noqa: F811 - a fixture
    backend = StreamingScriptedBackend(respond=hostile_reply)
    with running_app(backend, ServerConfig(schedule=Schedule.parse([3]))) as running:
        client = openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0)
        completion = client.chat.completions.create(
            model=f"scripted{HOSTILE}",
            messages=[{"role": "user", "content": f"Question {HOSTILE}"}],
            extra_body={"pacore": {"grading": "auto"}},  # the extracted answer is shown under a grading kind only
        )
        response = httpx.get(f"{running.base_url}/ui")
        assert "script-src" not in response.headers["content-security-policy"]  # so 'self' only
        assert "default-src 'self'" in response.headers["content-security-policy"]

        page.goto(f"{running.base_url}/ui#{completion.id}")
        page.locator(".round").nth(1).wait_for()
        page.locator("#final-answer").wait_for()

        # Each place that shows request or model text shows the markup as characters.
        assert page.locator(".request-item .question").first.text_content() == f"Question {HOSTILE}"
        assert page.locator(".detail .question").text_content() == f"Question {HOSTILE}"
        assert HOSTILE in page.locator(".meta").text_content()
        assert (
            page.locator(".card .message", has_text="the answer is 42").first.text_content()
            == f"{HOSTILE} the answer is 42"
        )
        assert page.locator(".card.failed .error").text_content() == f"status: HTTP 503 {HOSTILE}"
        assert page.locator("#final-answer .extracted").text_content() == HOSTILE
        assert HOSTILE in page.locator("#final-answer .answer-text").text_content()
        # ... and no element was made from it, and nothing ran.
        assert page.locator("script:not([src]), img, iframe, object, .pwned").count() == 0
        assert page.evaluate("window.__pwned") is None
        assert page.dialogs == []


# --- listening address ------------------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (IPv4, from the kernel's table)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


def test_the_server_listens_on_loopback_by_default_and_says_so(upstream):
    url, _ = upstream
    with running_cli("--backend", url, "--model", "m", "--schedule", "1") as (server, process):
        port = int(server.base_url.rsplit(":", 1)[1])
        assert listening_addresses(port) == {"127.0.0.1"}
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert server.start_line.startswith(
        f"pacore serve: listening on http://127.0.0.1:{port} (loopback only: this machine alone can connect)"
    )
    assert "warning" not in err
