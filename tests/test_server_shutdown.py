"""Graceful shutdown of the real ``pacore serve`` command.

The command runs in a subprocess in front of a slow upstream: another
pacore server, in-process, passing each call straight to a scripted
backend that takes its time (or hangs). SIGTERM must stop new
connections at once, let running requests finish within
``--grace-period``, end the rest with an OpenAI-format 503, and exit 0.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from fakes import Call, StreamingScriptedBackend
from pacore.schedule import Schedule
from pacore.server import ServerConfig
from server_harness import RunningServer, running_app, running_cli
from test_server import wait_for

pytestmark = pytest.mark.http

QUESTION = [{"role": "user", "content": "What is six times seven?"}]


def answer(call: Call, i: int) -> str:
    return f"the answer is {42 + call.number}"


def slow_upstream(delay: float) -> tuple[StreamingScriptedBackend, Callable[[], RunningServer]]:
    backend = StreamingScriptedBackend(delay=delay, respond=answer)
    return backend, lambda: running_app(backend, ServerConfig(schedule=Schedule(())))


class Client(threading.Thread):
    """One request in the background: its outcome is the answer text or the exception."""

    def __init__(self, server: RunningServer, stream: bool) -> None:
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)
        self.stream = stream
        self.outcome: str | BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            # pacore-1: one call, passed through to the upstream.
            reply = self.client.chat.completions.create(model="pacore-1/x", messages=QUESTION, stream=self.stream)
            if self.stream:
                self.outcome = "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
            else:
                self.outcome = reply.choices[0].message.content
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever happened
            self.outcome = exc


@pytest.fixture
def front() -> Iterator[Callable[..., object]]:
    """``front(upstream, grace)``: the real command in front of ``upstream``."""
    with contextlib.ExitStack() as stack:
        yield lambda upstream, grace: stack.enter_context(
            running_cli(
                "--backend",
                upstream.api_url,
                "--model",
                "scripted",
                "--schedule",
                "1",
                "--grace-period",
                str(grace),
            )  # fmt: skip
        )


def refuses_connections(server: RunningServer) -> bool:
    try:
        httpx.get(f"{server.base_url}/health", timeout=2)
    except (httpx.NetworkError, httpx.RemoteProtocolError):
        # ConnectError (refused), or ReadError / WriteError (reset) or RemoteProtocolError (closed):
        # the kernel accepted the connection into the backlog just before the listener closed, and
        # it was then dropped unanswered, before or after the request went out; refused all the same.
        return True
    except httpx.TimeoutException:
        return False  # accepted, slow to answer (a loaded machine): not refused yet
    return False


def stop(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=30)
    return process.returncode, out, err


def test_sigterm_lets_running_requests_finish_and_exits_0(front):
    backend = StreamingScriptedBackend(respond=answer, gate=threading.Event())
    with running_app(backend, ServerConfig(schedule=Schedule(()))) as inner:
        server, process = front(inner, 60)
        clients = [Client(server, stream=True), Client(server, stream=False)]
        wait_for(lambda: len(backend.calls) == 2)

        process.send_signal(signal.SIGTERM)
        wait_for(lambda: refuses_connections(server), timeout=30)
        # New connections are refused while the two requests are still running (their calls are held).
        assert all(client.is_alive() for client in clients)
        backend.gate.set()

        code, out, err = stop(process)
        for client in clients:
            client.join(timeout=30)
    assert sorted(client.outcome for client in clients) == ["the answer is 42", "the answer is 43"]
    assert backend.cancelled == []
    assert code == 0
    assert out.strip().endswith("pacore serve: stopped")
    assert "stopping: no new connections; 2 running requests get up to 60s to finish" in err
    assert "Traceback" not in err


def test_requests_still_running_after_the_grace_period_get_a_503(front):
    backend, upstream = slow_upstream(delay=120.0)
    with upstream() as inner:
        server, process = front(inner, 1)
        streamed, plain = Client(server, stream=True), Client(server, stream=False)
        wait_for(lambda: len(backend.calls) == 2)

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code, out, err = stop(process)
        # Ended by the 1 s grace period, long before the upstream would have answered (120 s).
        assert time.monotonic() - started < 60
        streamed.join(timeout=30)
        plain.join(timeout=30)
        # Ending a request cancels its backend calls, down to the upstream's own.
        wait_for(lambda: len(backend.cancelled) == 2)

    # The stream ends with an error event, the plain request with a 503: OpenAI's shape both.
    assert isinstance(streamed.outcome, openai.APIError)
    assert not isinstance(streamed.outcome, openai.APIConnectionError)
    assert streamed.outcome.body["code"] == "server_shutting_down"
    assert "grace period 1s" in streamed.outcome.message
    assert isinstance(plain.outcome, openai.InternalServerError)
    assert plain.outcome.status_code == 503
    assert plain.outcome.body["code"] == "server_shutting_down"
    assert code == 0
    assert "ended 2 requests still running after the grace period" in err
    assert "Traceback" not in err and "Exception in ASGI application" not in err


def test_a_draining_server_answers_new_requests_with_503():
    backend = StreamingScriptedBackend()
    with running_app(backend) as running:
        running.app.state.pacore.drain()
        with pytest.raises(openai.InternalServerError) as caught:
            openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0).chat.completions.create(
                model="scripted", messages=QUESTION
            )
        assert caught.value.status_code == 503
        assert caught.value.body["code"] == "server_shutting_down"
        assert httpx.get(f"{running.base_url}/health").status_code == 200
    assert backend.calls == []
