"""The embedded backend, with the real Gemma 3 270M model."""

from __future__ import annotations

import asyncio

import pytest

from pacore.backends import open_backend
from pacore.backends.base import GenerationParams
from pacore.backends.llama_cpp import (
    DEFAULT_MAX_TOKENS,
    LlamaCppBackend,
    _load,
    _plain_messages,
    default_model_path,
    generation_budget,
    has_system_role,
    smollm2_path,
    thread_count,
)
from pacore.errors import BackendError, UsageError

QUESTION = [{"role": "user", "content": "Name a colour."}]
WITH_SYSTEM = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Name a colour."}]


def test_system_prompt_is_folded_into_first_user_turn_and_images_dropped():
    plain = _plain_messages(
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Look"}, {"type": "image_url", "image_url": {"url": "data:,"}}],
            },
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


def test_system_turns_stay_system_turns_when_the_template_has_a_system_role():
    plain = _plain_messages([*WITH_SYSTEM, {"role": "assistant", "content": "rouge"}], system_role=True)
    assert plain == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "rouge"},
    ]


def test_system_role_is_detected_by_rendering_a_probe():
    from llama_cpp import llama_chat_format

    def formatter(template: str):
        return llama_chat_format.Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")

    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n"
    )
    refusing = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    )
    dropping = "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    assert has_system_role(formatter(chatml))
    assert not has_system_role(formatter(refusing))
    assert not has_system_role(formatter(dropping))
    assert not has_system_role(llama_chat_format.format_gemma)  # the embedded model's format drops it


def test_generation_budget_runs_to_the_context_end_unless_capped():
    assert generation_budget(100, 16384, None, None) == 16284  # a user GGUF: no 512 cap
    assert generation_budget(100, 16384, None, DEFAULT_MAX_TOKENS) == 512  # the embedded demo
    assert generation_budget(100, 16384, 2000, DEFAULT_MAX_TOKENS) == 2000  # max_tokens wins
    assert generation_budget(100, 1024, 2000, None) == 924  # never past the context


def test_thread_count_from_argument_environment_or_default(monkeypatch):
    monkeypatch.delenv("PACORE_THREADS", raising=False)
    assert thread_count() == 1
    assert thread_count(2) == 2
    monkeypatch.setenv("PACORE_THREADS", "2")
    assert thread_count() == 2 and thread_count(1) == 1
    monkeypatch.setenv("PACORE_THREADS", "two")
    with pytest.raises(UsageError, match="PACORE_THREADS must be a whole number"):
        thread_count()
    with pytest.raises(UsageError, match="at least 1"):
        thread_count(0)


def test_user_gguf_has_no_default_cap_and_the_embedded_model_keeps_its_own():
    assert LlamaCppBackend(smollm2_path()).default_max_tokens is None
    assert LlamaCppBackend().default_max_tokens == DEFAULT_MAX_TOKENS
    assert LlamaCppBackend(smollm2_path(), threads=2).threads == 2


def test_missing_gguf_is_a_usage_error():
    with pytest.raises(UsageError, match="GGUF file not found"):
        open_backend("gguf:/nonexistent/model.gguf")


def test_default_spec_opens_the_embedded_model():
    backend = open_backend(None)
    assert isinstance(backend, LlamaCppBackend)
    assert backend.path == default_model_path()
    assert default_model_path().stat().st_size > 100_000_000


def test_embedded_smollm2_spec_opens_the_instruct_model_from_its_package():
    backend = open_backend("embedded:smollm2")
    assert isinstance(backend, LlamaCppBackend)
    assert backend.path == smollm2_path()
    assert (backend.model, backend.default_max_tokens) == ("smollm2-135m-instruct", None)
    assert open_backend("embedded:smollm2", model="mine").model == "mine"
    assert open_backend("embedded:gemma").path == default_model_path()
    with pytest.raises(UsageError, match="unknown embedded model 'llama'"):
        open_backend("embedded:llama")


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
    tokens: list[int] = []  # the long call's token count, reported on the event loop
    generating = asyncio.Event()

    def count(index: int, total: int) -> None:
        tokens.append(total)
        generating.set()

    long_params = GenerationParams(max_tokens=2000, seed=3, extra={"min_p": 0.0})
    long_call = asyncio.create_task(backend.generate(QUESTION, 1, long_params, on_progress=count))
    await asyncio.wait_for(generating.wait(), timeout=120)
    long_call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long_call
    (short,) = await backend.generate(QUESTION, 1, GenerationParams(max_tokens=4, seed=3))
    assert short.ok
    # The model's one worker ran the short call after the cancelled one stopped: had the cancel
    # not stopped it, its 2000 tokens would all have come first. (A token count, not a wall-clock
    # bound, so a busy machine cannot fail it.)
    assert tokens and tokens[-1] < 500


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
async def test_smollm2_gets_its_system_prompt_as_a_system_turn_and_generates_past_512_tokens():
    path = smollm2_path()
    loaded = _load(path, 2048, None, 1)
    prompt, stops = loaded.format(WITH_SYSTEM)
    # SmolLM2's own ChatML template, with the system prompt in its own turn (not its default one).
    assert prompt.startswith(
        "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>"
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" not in prompt

    backend = LlamaCppBackend(path, n_ctx=2048, threads=1)
    # With max_tokens unset, a call may run to the end of the context, well past the old cap of 512.
    prompt_tokens = len(loaded.llama.tokenize(prompt.encode(), add_bos=True, special=True))
    assert generation_budget(prompt_tokens, backend.n_ctx, None, backend.default_max_tokens) == 2048 - prompt_tokens
    (completion,) = await backend.generate(WITH_SYSTEM, 1, GenerationParams(max_tokens=40, seed=11, temperature=0.7))
    # A real answer that ends at the template's end-of-turn, not an empty one cut by an empty stop string.
    assert completion.ok and completion.text.strip() and 1 < completion.completion_tokens <= 40
    assert completion.prompt_tokens == prompt_tokens
    assert "<|im_end|>" not in completion.text and "<|im_start|>" not in completion.text
