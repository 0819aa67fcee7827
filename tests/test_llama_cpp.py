"""The embedded backend, with the real Gemma 3 270M model."""

from __future__ import annotations

import asyncio
import time

import pytest

import pacore
from pacore.backends import open_backend
from pacore.backends.base import GenerationParams
from pacore.backends.llama_cpp import LlamaCppBackend, _plain_messages, default_model_path
from pacore.errors import BackendError, UsageError

QUESTION = [{"role": "user", "content": "Name a colour."}]


def test_system_prompt_is_folded_into_first_user_turn_and_images_dropped():
    plain = _plain_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image_url", "image_url": {"url": "data:,"}}]},
            {"role": "assistant", "content": "ok"},
            {"role": "tool", "content": "42"},
            {"role": "user", "content": "again"},
        ]
    )
    assert plain == [
        {"role": "user", "content": "Be brief.\n\nLook"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Tool result:\n42"},
        {"role": "user", "content": "again"},
    ]


def test_missing_gguf_is_a_usage_error():
    with pytest.raises(UsageError, match="GGUF file not found"):
        open_backend("gguf:/nonexistent/model.gguf")


def test_default_spec_opens_the_embedded_model():
    backend = open_backend(None)
    assert isinstance(backend, LlamaCppBackend)
    assert backend.path == default_model_path()
    assert default_model_path().stat().st_size > 100_000_000


@pytest.mark.model
async def test_generate_samples_differ_by_seed_and_count_tokens():
    backend = LlamaCppBackend()
    params = GenerationParams(max_tokens=12, seed=7)
    first = await backend.generate(QUESTION, 2, params)
    again = await backend.generate(QUESTION, 2, params)
    assert [c.text for c in first] == [c.text for c in again]  # reproducible
    assert first[0].text != first[1].text  # each sample has its own seed
    for completion in first:
        assert completion.ok
        assert 0 < completion.completion_tokens <= 12
        assert completion.prompt_tokens > 3
        assert completion.finish_reason in {"stop", "length"}
        assert completion.latency_s > 0


@pytest.mark.model
async def test_stream_delivers_pieces_that_add_up_to_the_text():
    backend = LlamaCppBackend()
    pieces: list[str] = []
    completion = await backend.stream(
        QUESTION, GenerationParams(max_tokens=16, seed=1), lambda content, _: pieces.append(content)
    )
    assert len(pieces) >= 2
    assert "".join(pieces) == completion.text
    assert completion.completion_tokens > 0


@pytest.mark.model
async def test_cancelling_a_call_frees_the_model_at_once():
    backend = LlamaCppBackend()
    long_call = asyncio.create_task(
        backend.generate(QUESTION, 1, GenerationParams(max_tokens=2000, seed=3, extra={"min_p": 0.0}))
    )
    await asyncio.sleep(0.5)
    long_call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long_call
    started = time.perf_counter()
    (short,) = await backend.generate(QUESTION, 1, GenerationParams(max_tokens=4, seed=3))
    # 2000 tokens would take ~20 s here; the next call must not wait for them.
    assert time.perf_counter() - started < 5
    assert short.ok


@pytest.mark.model
async def test_prompt_longer_than_context_is_a_clear_error():
    backend = LlamaCppBackend(default_model_path(), n_ctx=256, chat_format="gemma")
    with pytest.raises(BackendError, match=r"does not fit the model's context \(256 tokens\)") as info:
        await backend.generate([{"role": "user", "content": "word " * 400}], 1, GenerationParams(max_tokens=4))
    # That call's trajectory fails (kind context); the request is not stopped for it.
    assert info.value.kind == "context" and not info.value.fatal


@pytest.mark.model
async def test_generate_reports_progress_token_by_token():
    backend = LlamaCppBackend()
    progress: list[tuple[int, int]] = []
    completions = await backend.generate(
        QUESTION, 2, GenerationParams(max_tokens=8, seed=7), on_progress=lambda i, t: progress.append((i, t))
    )
    for index, completion in enumerate(completions):
        counts = [t for i, t in progress if i == index]
        assert counts == list(range(1, len(counts) + 1)) and len(counts) >= completion.completion_tokens > 0


@pytest.mark.model
def test_solve_with_the_embedded_model_end_to_end():
    result = pacore.solve(
        "What is 2+3?", schedule=2, params=GenerationParams(max_tokens=24, seed=5, temperature=0.8)
    )
    assert [len(r.trajectories) for r in result.rounds] == [2, 1]
    assert result.usage.completion_tokens == sum(
        t.completion_tokens for r in result.rounds for t in r.trajectories
    )
    assert result.usage.completion_tokens > 0
    assert result.rounds[1].trajectories[0].prompt_tokens > result.rounds[0].trajectories[0].prompt_tokens
    assert result.model == "gemma-3-270m-q4_k_m"
