"""Process verification (in the spirit of PRIME): an LLM judges whether a derivation is valid.

An outcome reward only checks the final answer, so a lucky guess or a broken
derivation that lands on the right number earns full reward. A
:class:`Verifier` asks a model, through any pacore backend (an
OpenAI-compatible URL, a GGUF file, the embedded model), whether the
derivation of a response is valid, and reads the last ``VERDICT: VALID`` /
``VERDICT: INVALID`` line of its answer.

- The prompt is a jinja2 template with the variables ``problem``,
  ``response`` and ``ground_truth``, rendered in jinja2's sandbox (users load
  templates from anywhere); the default is ``pacore/prompts/verifier.j2``.
- Verdicts are cached in a small SQLite file keyed by a hash of everything
  that decides them (template, model, problem, response, ground truth), so a
  response seen again (GRPO groups repeat, a report is re-run) costs no call.
  Only definite verdicts are cached; a failed or unreadable judgement is
  ``None`` and is asked again next time.

The verifier is synchronous to its callers (verl calls reward functions from
worker threads, TRL from its training loop): it runs its backend on an event
loop of its own, in a daemon thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from pacore.backends import Backend, GenerationParams, open_backend
from pacore.backends.llama_cpp import cache_dir as models_cache_dir
from pacore.errors import BackendError, TemplateError, UsageError
from pacore.messages import compact
from pacore.prompts import compile_template, read_template_file, render_bounded

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE_NAME = "verifier.j2"
#: Deterministic judging, room for a short explanation before the verdict.
DEFAULT_PARAMS = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=1024)
DEFAULT_CONCURRENCY = 8

_VERDICT = re.compile(r"VERDICT\s*[:=]\s*[*_`\"']*\s*(VALID|INVALID)\b", re.IGNORECASE)


def default_cache_path() -> Path:
    """``verdicts.sqlite`` in pacore's cache directory (``$PACORE_CACHE_DIR``, else ``~/.cache/pacore``)."""
    return models_cache_dir().parent / "verdicts.sqlite"


class VerifierTemplate:
    """A compiled verifier prompt (variables ``problem``, ``response``, ``ground_truth``)."""

    def __init__(self, source: str, origin: str = "<string>") -> None:
        self.source = source
        self.origin = origin
        self._template = compile_template(source, origin)  # the synthesis templates' bounded sandbox
        self.render("Problem", "Response", "Answer")  # fail now, not after the first rollout

    @classmethod
    def load(cls, template: VerifierTemplate | str | Path | None) -> VerifierTemplate:
        """``None`` gives the default; a path loads a file; a template passes through."""
        if isinstance(template, VerifierTemplate):
            return template
        if template is None:
            source = files("pacore.prompts").joinpath(DEFAULT_TEMPLATE_NAME).read_text(encoding="utf-8")
            return cls(source, origin=f"pacore/prompts/{DEFAULT_TEMPLATE_NAME}")
        return cls(read_template_file(template, what="verifier template"), origin=str(template))

    def render(self, problem: str, response: str, ground_truth: str) -> str:
        values = {"problem": problem, "response": response, "ground_truth": ground_truth}
        text = render_bounded(self._template, values, f"verifier {self.origin}")
        if not text.strip():
            raise TemplateError(f"verifier template {self.origin}: rendered an empty prompt")
        return text


def parse_verdict(text: str | None) -> bool | None:
    """``True`` / ``False`` from the last ``VERDICT: VALID|INVALID`` of ``text``; ``None`` if it has none."""
    matches = _VERDICT.findall(compact(text) or "")
    return matches[-1].upper() == "VALID" if matches else None


class VerdictCache:
    """Verdicts by content hash in one SQLite file; safe to share between threads and processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, valid INTEGER NOT NULL)")
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"cannot use the verdict cache {self.path}: {exc}") from None
        self._lock = threading.Lock()

    def get(self, key: str) -> bool | None:
        with self._lock:
            row = self._db.execute("SELECT valid FROM verdicts WHERE key = ?", (key,)).fetchone()
        return None if row is None else bool(row[0])

    def put(self, key: str, valid: bool) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO verdicts (key, valid) VALUES (?, ?)", (key, int(valid)))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass
class VerifierStats:
    """What a verifier did: model calls, cache hits, and judgements it could not read."""

    calls: int = 0
    cache_hits: int = 0
    unknown: int = 0


@dataclass(frozen=True, slots=True)
class Judgement:
    """One item to judge."""

    problem: str
    response: str
    ground_truth: str


class Verifier:
    """Judges derivations with a model; see the module docstring.

    ``backend`` is a :class:`~pacore.backends.Backend` or a backend spec
    (``http://host:port/v1``, ``gguf:/path``, ``embedded``); a spec is opened
    here and closed by :meth:`close`. ``cache`` is the verdict cache file
    (default :func:`default_cache_path`), or ``False`` for none.
    """

    def __init__(
        self,
        backend: Backend | str,
        *,
        template: VerifierTemplate | str | Path | None = None,
        cache: str | Path | bool | None = None,
        params: GenerationParams = DEFAULT_PARAMS,
        concurrency: int = DEFAULT_CONCURRENCY,
        **backend_options: Any,
    ) -> None:
        if concurrency < 1:
            raise UsageError(f"verifier concurrency must be at least 1, got {concurrency}")
        self.template = VerifierTemplate.load(template)
        self.params = params
        self.stats = VerifierStats()
        self._owned = not isinstance(backend, Backend)
        self.backend: Backend = backend if isinstance(backend, Backend) else open_backend(backend, **backend_options)
        # Fixed now: an HTTP backend learns its model name on its first call, and keys must not change.
        spec = backend if isinstance(backend, str) else self.backend.name
        self._identity = [self.template.source, spec, self.backend.model]
        if cache is False:
            self.cache = None
        else:
            self.cache = VerdictCache(default_cache_path() if cache is None or cache is True else cache)
        self._concurrency = concurrency
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pacore-verifier", daemon=True)
        self._thread.start()

    def key(self, item: Judgement) -> str:
        """The cache key: a hash of everything that decides the verdict."""
        identity = [*self._identity, item.problem, item.response, item.ground_truth]
        return hashlib.sha256(json.dumps(identity, ensure_ascii=False).encode("utf-8")).hexdigest()

    def verify(self, problem: str, response: str, ground_truth: str) -> bool | None:
        """Whether the derivation in ``response`` is valid; ``None`` when no verdict could be had."""
        return self.verify_many([Judgement(problem, response, ground_truth)])[0]

    def verify_many(self, items: Sequence[Judgement]) -> list[bool | None]:
        """Verdicts of ``items`` in order; up to ``concurrency`` model calls at once, cached ones free."""
        future: Future[list[bool | None]] = asyncio.run_coroutine_threadsafe(self._verify_all(items), self._loop)
        return future.result()

    async def _verify_all(self, items: Sequence[Judgement]) -> list[bool | None]:
        limit = asyncio.Semaphore(self._concurrency)
        pending: dict[str, asyncio.Task[bool | None]] = {}  # the same item twice costs one call

        async def judged(item: Judgement) -> bool | None:
            async with limit:
                return await self._judge(item)

        for item in items:
            key = self.key(item)
            if key not in pending:
                pending[key] = asyncio.ensure_future(judged(item))
        results = {key: await task for key, task in pending.items()}
        return [results[self.key(item)] for item in items]

    async def _judge(self, item: Judgement) -> bool | None:
        key = self.key(item)
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            self.stats.cache_hits += 1
            return cached
        prompt = self.template.render(item.problem, item.response, item.ground_truth)
        self.stats.calls += 1
        try:
            (completion,) = await self.backend.generate([{"role": "user", "content": prompt}], 1, self.params)
        except BackendError as exc:
            if exc.fatal:
                raise
            log.warning("verifier call failed: %s", exc)
            self.stats.unknown += 1
            return None
        verdict = parse_verdict(completion.text) if completion.ok else None
        if verdict is None:
            self.stats.unknown += 1
            log.warning("verifier gave no verdict (%s)", completion.error or "no VERDICT line")
            return None
        if self.cache is not None:
            self.cache.put(key, verdict)
        return verdict

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._owned:
            asyncio.run_coroutine_threadsafe(self.backend.aclose(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
