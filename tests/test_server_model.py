"""``pacore serve`` end to end: the real command, the real embedded model, the real SDK.

What the README promises: start the server, point the ``openai`` SDK at
it, get a (streamed) PaCoRe answer, find the request in the viewer's data
and see the work in ``/metrics``.
"""

from __future__ import annotations

import signal
import subprocess

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_harness import PACORE, running_cli

pytestmark = [pytest.mark.model, pytest.mark.http]

QUESTION = "Name one colour of the rainbow."


@pytest.fixture(scope="module")
def served():
    with running_cli("--schedule", "2", "--max-tokens", "24", "--history", "5", "--api-key", "k1") as (server, process):
        yield server, process


def test_plain_and_streamed_answers_from_the_embedded_model(served):
    server, _ = served
    client = openai.OpenAI(base_url=server.api_url, api_key="k1", max_retries=0)

    completion = client.chat.completions.create(
        model="gemma-3-270m-q4_k_m", messages=[{"role": "user", "content": QUESTION}], max_tokens=16, seed=1
    )
    extension = completion.model_extra["pacore"]
    assert [r["k"] for r in extension["rounds"]] == [2, 1]
    assert extension["backend_model"] == "gemma-3-270m-q4_k_m"
    assert completion.choices[0].message.content.strip()
    assert 0 < completion.usage.completion_tokens == sum(r["completion_tokens"] for r in extension["rounds"])
    assert completion.usage.completion_tokens <= 3 * 16

    stream = client.chat.completions.create(
        model="pacore-2/gemma-3-270m-q4_k_m",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    progress = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    assert len(content) > 1, "the answer should arrive token by token"
    assert "round 1/2: 2/2 trajectories done" in progress
    assert chunks[-1].usage.completion_tokens > 0

    headers = {"Authorization": "Bearer k1"}
    listing = httpx.get(f"{server.base_url}/ui/api/requests", headers=headers).json()["data"]
    assert [r["status"] for r in listing] == ["done", "done"]
    detail = httpx.get(f"{server.base_url}/ui/api/requests/{completion.id}", headers=headers).json()
    assert [len(r["trajectories"]) for r in detail["rounds"]] == [2, 1]

    text = httpx.get(f"{server.base_url}/metrics", headers=headers).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("pacore_trajectories_total", (("outcome", "ok"),))] == 6
    assert (
        samples[("pacore_generated_tokens_total", ())]
        == completion.usage.completion_tokens + chunks[-1].usage.completion_tokens
    )


def test_the_command_stops_cleanly_on_ctrl_c():
    with running_cli("--schedule", "1") as (server, process):
        assert httpx.get(f"{server.base_url}/health").json()["model"] == "gemma-3-270m-q4_k_m"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--max-trajectories", "3"], 2, "runs 17 trajectories"),
        (["--schedule", "2", "--max-concurrent-requests", "0"], 2, "'--max-concurrent-requests'"),
        (["--schedule", "lots"], 2, "is not a count"),
        (["--port", "70000"], 2, "is not a port"),
    ],
)
def test_misuse_is_a_one_line_error(args, code, words):
    done = subprocess.run([PACORE, "serve", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == code
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and words in done.stderr and "Traceback" not in done.stderr


def test_a_busy_port_is_a_runtime_error():
    with running_cli("--schedule", "1") as (server, _):
        port = server.base_url.rsplit(":", 1)[1]
        done = subprocess.run([PACORE, "serve", "--port", port], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith(f"pacore: error: cannot listen on 127.0.0.1:{port}")
