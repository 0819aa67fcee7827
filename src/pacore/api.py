"""The public ``pacore.asolve`` / ``solve`` / ``iter_solve``: the engine plus backend specs.

The engine (:func:`pacore.engine.asolve`) takes only an open Backend. Here a
spec string, a list of specs or ``None`` is opened for the one request and
closed after it, which is what a script or notebook wants; the front doors
(CLI, server, batch runner) open their backend themselves and call the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pacore import engine
from pacore.backends import Backend, open_backend
from pacore.backends.base import is_backend
from pacore.engine import Prompt
from pacore.errors import UsageError
from pacore.trace import Event, Result

BackendChoice = Backend | str | Sequence[str] | None


async def asolve(prompt: Prompt, *, backend: BackendChoice = None, **options: Any) -> Result:
    """Answer ``prompt`` with parallel coordinated reasoning.

    ``backend`` is a Backend, a backend spec (``http://host:port/v1``,
    ``gguf:/path``), a list of specs (calls go to the least busy, see
    :func:`pacore.open_backend`) or ``None`` for the embedded model; a
    backend opened from specs is closed before returning.

    The other options are those of :func:`pacore.engine.asolve`: ``schedule``
    (the coordinated rounds' trajectory counts, or a preset name), ``params``,
    ``template``, ``seed``, ``on_event``, ``min_success``, ``deadline``,
    ``stream_answer``, ``first_round``, ``reference_order`` and ``compute``.

    Raises a :class:`PacoreError`; its ``result`` holds the partial trace.
    When cancelled, the ``asyncio.CancelledError`` carries it as ``result`` too.
    """
    if is_backend(backend):
        return await engine.asolve(prompt, backend=backend, **options)
    # A registered factory may return any Backend, not only a context manager.
    opened = open_backend(_checked_specs(backend))
    try:
        return await engine.asolve(prompt, backend=opened, **options)
    finally:
        await opened.aclose()


def solve(prompt: Prompt, **options: Any) -> Result:
    """Synchronous :func:`asolve` (for scripts and notebooks without a loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(asolve(prompt, **options))
    raise RuntimeError("solve() was called inside a running event loop; use 'await asolve(...)'")


async def iter_solve(prompt: Prompt, **options: Any) -> AsyncIterator[Event]:
    """Yield the engine's events as they happen; the last one is :class:`Final`.

    Takes the options of :func:`asolve`. Errors are raised after the ``Final``
    event that carries the partial trace. Closing the iterator early cancels
    the request and its backend calls.
    """
    queue: asyncio.Queue[Event | None] = asyncio.Queue()
    task = asyncio.create_task(asolve(prompt, on_event=queue.put_nowait, **options))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while (event := await queue.get()) is not None:
            yield event
        await task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _checked_specs(backend: object) -> str | Sequence[str] | None:
    """``backend`` when it is a spec, a list of specs or ``None``; else a one-line UsageError."""
    if backend is None or isinstance(backend, str):
        return backend
    if (
        isinstance(backend, Sequence)
        and not isinstance(backend, (bytes, bytearray))
        and all(isinstance(spec, str) for spec in backend)
    ):
        return backend
    raise UsageError(f"backend must be a Backend, a backend spec string, a list of specs or None, not {backend!r}")
