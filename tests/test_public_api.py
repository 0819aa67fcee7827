"""The public surface: ``pacore`` and ``pacore.eval`` export what users need, and importing is cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pacore
import pacore.eval
from fakes import ScriptedBackend


@pytest.mark.parametrize("module", [pacore, pacore.eval], ids=lambda m: m.__name__)
def test_every_exported_name_resolves(module) -> None:
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_the_engine_backends_and_evaluation_entry_points_are_exported() -> None:
    from pacore.backends.openai_http import OpenAIBackend
    from pacore.backends.router import RouterBackend
    from pacore.engine import asample
    from pacore.eval.runner import run_dataset

    assert pacore.OpenAIBackend is OpenAIBackend
    assert pacore.RouterBackend is RouterBackend
    assert pacore.asample is asample
    assert pacore.eval.run_dataset is run_dataset
    with pytest.raises(AttributeError, match="no_such_name"):
        pacore.no_such_name  # noqa: B018


def test_importing_pacore_does_not_load_the_http_client() -> None:
    code = "import sys, pacore; print('httpx' in sys.modules, 'llama_cpp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


class _ClosingBackend(ScriptedBackend):
    closed = 0

    async def aclose(self) -> None:
        self.closed += 1


def test_pacore_solve_opens_a_spec_for_the_request_and_closes_it(monkeypatch) -> None:
    from pacore import backends

    opened: list[_ClosingBackend] = []
    monkeypatch.setitem(
        backends._REGISTRY, "scripted:", lambda spec, **_: opened.append(_ClosingBackend()) or opened[-1]
    )
    result = pacore.solve("Q", schedule=[2], backend="scripted:one")
    assert result.answer and [b.closed for b in opened] == [1]
    given = _ClosingBackend()
    pacore.solve("Q", schedule=[2], backend=given)
    assert given.closed == 0  # a Backend passed in stays open: its owner closes it


async def test_the_engine_takes_only_an_open_backend() -> None:
    from pacore.engine import asolve

    with pytest.raises(pacore.UsageError, match="pacore.asolve opens backend specs"):
        await asolve("Q", backend="http://127.0.0.1:9/v1")
