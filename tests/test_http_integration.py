"""The HTTP backend against a real OpenAI-compatible server on loopback.

llama-cpp-python's own server serves the embedded Gemma 3 270M GGUF (started
once per session by the ``llama_server_url`` fixture). It ignores ``n`` and
sends no usage in streams, so these tests also exercise the n fallback and
the chunk-counting estimate.
"""

from __future__ import annotations

import pytest

import pacore
from pacore.backends import open_backend
from pacore.backends.base import GenerationParams
from pacore.backends.openai_http import MAX_N, OpenAIBackend

pytestmark = pytest.mark.http

MESSAGES = [{"role": "user", "content": "Name three colours."}]
PARAMS = GenerationParams(max_tokens=16, seed=1)


async def test_generate_one_completion(llama_server_url):
    async with OpenAIBackend(llama_server_url) as backend:
        (completion,) = await backend.generate(MESSAGES, 1, PARAMS)
        # The model was discovered from GET /models.
        assert backend.model.endswith(".gguf") and backend.model in backend.name
    assert completion.ok and completion.text.strip()
    assert completion.finish_reason in ("stop", "length")
    assert completion.prompt_tokens > 0 and 0 < completion.completion_tokens <= 16


async def test_n_falls_back_to_single_calls_on_a_server_that_ignores_n(llama_server_url):
    async with OpenAIBackend(llama_server_url) as backend:
        assert backend.max_n == MAX_N
        completions = await backend.generate(MESSAGES, 3, PARAMS)
        assert backend.max_n == 1
    assert len(completions) == 3
    assert all(c.ok and c.text and c.completion_tokens > 0 and c.prompt_tokens > 0 for c in completions)
    # Seeds 1, 2, 3 were used: the three samples are not copies of one another.
    assert len({c.text for c in completions}) > 1


async def test_stream_yields_deltas_and_usage(llama_server_url):
    deltas: list[str] = []
    async with OpenAIBackend(llama_server_url) as backend:
        completion = await backend.stream(
            MESSAGES, GenerationParams(max_tokens=24), lambda content, reasoning: deltas.append(content)
        )
    assert len(deltas) >= 3 and "".join(deltas) == completion.text
    assert completion.finish_reason in ("stop", "length")
    # This server sends no usage chunk: the count of text chunks stands in.
    assert 0 < completion.completion_tokens <= 24


async def test_asolve_runs_every_round_against_the_server(llama_server_url):
    events = []
    async with open_backend(llama_server_url) as backend:
        result = await pacore.asolve(
            "What is 2+3?",
            schedule=[2],
            backend=backend,
            params=GenerationParams(max_tokens=24),
            on_event=events.append,
        )
    assert result.answer.strip()
    assert result.usage.calls == 3 and result.usage.failed_calls == 0
    assert result.usage.completion_tokens > 0 and result.usage.prompt_tokens > 0
    # The synthesis call read the first round's messages, so its prompt is longer.
    first, final = result.rounds
    assert final.trajectories[0].prompt_tokens > max(t.prompt_tokens for t in first.trajectories)
    assert result.backend.startswith(f"openai {llama_server_url}")
    assert events[-1].type == "final"


def test_one_backend_serves_several_solve_calls(llama_server_url):
    # Each pacore.solve runs its own event loop; pooled connections must not leak across them.
    backend = OpenAIBackend(llama_server_url)
    for _ in range(2):
        result = pacore.solve("Say hi.", schedule="off", backend=backend, params=GenerationParams(max_tokens=4))
        assert result.usage.calls == 1 and result.usage.failed_calls == 0
