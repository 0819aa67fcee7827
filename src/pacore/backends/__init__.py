"""Backends, chosen from a spec string through a small registry.

- ``None``, ``"embedded"`` or ``"llama-cpp"``: the embedded Gemma 3 270M model (a base model);
- ``"embedded:smollm2"``: the embedded SmolLM2-135M-Instruct (it follows instructions);
- ``"gguf:/path/model.gguf"`` (or any path ending in ``.gguf``): that GGUF file;
- ``"http://host:port/v1"`` / ``"https://..."``: an OpenAI-compatible server;
- a list of specs: one backend routing each call to the least busy of them.

New kinds plug in with :func:`register_backend` without touching the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pacore._lazy import lazy_attributes
from pacore.backends.base import (
    Backend,
    BaseBackend,
    Completion,
    GenerationParams,
    Message,
    RetryPolicy,
)
from pacore.backends.llama_cpp import LlamaCppBackend
from pacore.backends.router import BreakerPolicy, RouterBackend
from pacore.errors import UsageError

BackendFactory = Callable[..., Backend]

_REGISTRY: dict[str, BackendFactory] = {}


def register_backend(prefix: str, factory: BackendFactory) -> None:
    """Make specs starting with ``prefix`` (e.g. ``"http://"``) open with ``factory``.

    The factory is called as ``factory(spec, **options)``.
    """
    _REGISTRY[prefix] = factory


def _openai(spec: str, **options: Any) -> Backend:
    from pacore.backends.openai_http import OpenAIBackend

    options.pop("threads", None)  # a local model's option; the server has its own
    return OpenAIBackend(spec, **options)


def _gguf(spec: str, **options: Any) -> Backend:
    path = spec.removeprefix("gguf:")
    return LlamaCppBackend(path or None, **_local_options(options))


def _embedded(spec: str, **options: Any) -> Backend:
    name = spec.partition(":")[2].strip().lower()
    if name in ("", "gemma"):
        return LlamaCppBackend(None, **_local_options(options))
    if name == "smollm2":
        from pacore.backends.llama_cpp import SMOLLM2_MODEL_NAME, smollm2_path

        options = _local_options(options)
        options["model"] = options.get("model") or SMOLLM2_MODEL_NAME
        return LlamaCppBackend(smollm2_path(), **options)
    raise UsageError(f"unknown embedded model {name!r}: use 'embedded' (Gemma 3 270M) or 'embedded:smollm2'")


def _local_options(options: dict[str, Any]) -> dict[str, Any]:
    # HTTP-only options make no sense for a local model; ignore them quietly
    # so one set of CLI flags works with every backend.
    for key in ("api_key", "timeout", "retry", "n_mode", "max_connections"):
        options.pop(key, None)
    return options


register_backend("http://", _openai)
register_backend("https://", _openai)
register_backend("gguf:", _gguf)
register_backend("embedded", _embedded)
register_backend("llama-cpp", _embedded)


def open_backend(spec: str | Sequence[str] | None = None, **options: Any) -> Backend:
    """Open the backend a spec names (see the module docstring).

    ``options`` go to the backend's constructor (``model``, ``api_key``,
    ``timeout``, ``retry``... for HTTP; ``model`` is ignored by local models
    unless they support it). Several specs give a
    :class:`~pacore.backends.router.RouterBackend` over them, all opened
    with the same options.
    """
    if spec is not None and not isinstance(spec, str):
        specs = list(spec)
        if len(specs) > 1:
            return RouterBackend([open_backend(one, **options) for one in specs])
        spec = specs[0] if specs else None
    if spec is None or not spec.strip():
        return _embedded("embedded", **options)
    spec = spec.strip()
    for prefix, factory in _REGISTRY.items():
        if spec.startswith(prefix):
            return factory(spec, **options)
    if spec.lower().endswith(".gguf"):
        return _gguf(spec, **options)
    raise UsageError(
        f"unknown backend {spec!r}: use an http(s):// URL of an OpenAI-compatible server, "
        "gguf:/path/to/model.gguf, or 'embedded'"
    )


__all__ = [
    "Backend",
    "BaseBackend",
    "BreakerPolicy",
    "Completion",
    "GenerationParams",
    "LlamaCppBackend",
    "Message",
    "OpenAIBackend",
    "RetryPolicy",
    "RouterBackend",
    "open_backend",
    "register_backend",
]


# Imported on first use: the HTTP client costs import time that users of
# the embedded model need not pay.
__getattr__ = lazy_attributes(__name__, {"pacore.backends.openai_http": ("OpenAIBackend",)})
