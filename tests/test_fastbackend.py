"""The benchmarks' fast backend speaks the OpenAI protocol (so ``bench/`` does not rot).

It runs as its own process, exactly as the benchmarks start it, and is
checked with the real ``openai`` SDK and with pacore's own HTTP backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import openai
import pytest

from harness import FastBackend, fast_backend
from pacore import GenerationParams, asolve
from pacore.backends.openai_http import OpenAIBackend

pytestmark = pytest.mark.http
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server() -> Iterator[FastBackend]:
    with fast_backend("--completion-tokens", 12, "--model", "fast-model") as running:
        yield running


def test_lists_its_model(server: FastBackend) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="unused")
    assert [model.id for model in client.models.list()] == ["fast-model"]


def test_returns_n_choices_with_usage(server: FastBackend) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="unused")
    reply = client.chat.completions.create(model="fast-model", messages=MESSAGES, n=3)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert all(len(choice.message.content.split()) == 12 for choice in reply.choices)
    assert {choice.finish_reason for choice in reply.choices} == {"stop"}
    assert reply.usage.completion_tokens == 36
    assert reply.usage.prompt_tokens > 0


def test_max_tokens_cuts_the_completion(server: FastBackend) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="unused")
    reply = client.chat.completions.create(model="fast-model", messages=MESSAGES, max_tokens=5)
    assert len(reply.choices[0].message.content.split()) == 5
    assert reply.choices[0].finish_reason == "length"


def test_streams_the_same_text_with_usage(server: FastBackend) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="unused")
    whole = client.chat.completions.create(model="fast-model", messages=MESSAGES)
    chunks = list(
        client.chat.completions.create(
            model="fast-model", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len([p for p in pieces if p]) == 12  # one token per chunk
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_streams_n_choices(server: FastBackend) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="unused")
    texts: dict[int, str] = {}
    for chunk in client.chat.completions.create(model="fast-model", messages=MESSAGES, n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(texts) == [0, 1]
    assert all(len(text.split()) == 12 for text in texts.values())


def test_keep_alive_and_errors_in_openai_shape(server: FastBackend) -> None:
    with httpx.Client(base_url=server.url, limits=httpx.Limits(max_connections=1)) as client:
        for _ in range(3):  # one connection serves them all
            assert client.post("/chat/completions", json={"messages": MESSAGES}).status_code == 200
        bad = client.post("/chat/completions", content=b"{not json")
        assert bad.status_code == 400
        assert "not valid JSON" in bad.json()["error"]["message"]
        assert client.get("/nowhere").status_code == 404
        closing = client.post("/chat/completions", json={"messages": MESSAGES}, headers={"Connection": "close"})
        assert closing.headers.get("connection") == "close"
        assert client.post("/chat/completions", json={"messages": MESSAGES}).status_code == 200


def test_n_support_can_be_ignored_or_refused() -> None:
    with fast_backend("--n-support", "ignore") as ignoring, fast_backend("--n-support", "reject") as refusing:
        client = openai.OpenAI(base_url=ignoring.url, api_key="unused")
        assert len(client.chat.completions.create(model="fast", messages=MESSAGES, n=4).choices) == 1
        client = openai.OpenAI(base_url=refusing.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="only n=1"):
            client.chat.completions.create(model="fast", messages=MESSAGES, n=4)
        assert len(client.chat.completions.create(model="fast", messages=MESSAGES).choices) == 1


async def test_concurrency_cap_queues_samples_and_endpoints_are_separate() -> None:
    with fast_backend("--concurrency", 2, "--ttft-ms", 50, "--endpoints", 2) as server:
        async with httpx.AsyncClient() as client:

            async def call(url: str, n: int) -> int:
                body = {"messages": MESSAGES, "n": n}
                response = await client.post(url + "/chat/completions", json=body)
                return len(response.json()["choices"])

            counts = await asyncio.gather(*(call(server.urls[0], 1) for _ in range(5)), call(server.urls[1], 3))
        assert counts == [1, 1, 1, 1, 1, 3]
        first, second = server.stats()
        assert (first["calls"], first["samples"], first["peak_active"]) == (5, 5, 2)
        # A call of n=3 above the cap of 2 takes the whole endpoint rather than waiting forever.
        assert (second["calls"], second["samples"], second["peak_active"]) == (1, 3, 3)


async def test_pacore_runs_against_it_batched_and_streamed(server: FastBackend) -> None:
    async with OpenAIBackend(server.url) as backend:
        result = await asolve("q", schedule=[6], backend=backend, params=GenerationParams(max_tokens=8))
        deltas: list[str] = []
        streamed = await backend.stream(MESSAGES, GenerationParams(), lambda content, _: deltas.append(content))
    assert backend.model == "fast-model"
    assert result.usage.calls == 7 and result.usage.failed_calls == 0
    assert result.usage.completion_tokens == 7 * 8
    assert len(result.answer.split()) == 8
    assert "".join(deltas) == streamed.text and len(deltas) == 12


@pytest.mark.parametrize("support", ["ignore", "reject"])
async def test_pacore_reads_servers_that_do_not_stream(support: str) -> None:
    # ``ignore``: plain JSON although a stream was asked; ``reject``: HTTP 400 to ``stream``.
    with fast_backend("--completion-tokens", 12, "--stream-support", support) as plain:
        async with OpenAIBackend(plain.url, model="fast") as backend:
            first = await backend.generate(MESSAGES, 3, GenerationParams())
            deltas: list[str] = []
            answer = await backend.stream(MESSAGES, GenerationParams(), lambda c, r: deltas.append(c))
        (stats,) = plain.stats()
    assert [len(c.text.split()) for c in first] == [12, 12, 12] and all(c.ok for c in first)
    assert answer.ok and deltas == [answer.text]  # one delta: the whole answer
    # Refused once, then remembered: every later call goes without streaming.
    assert stats["calls"] == 2
