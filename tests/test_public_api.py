"""The public surface: ``pacore`` and ``pacore.eval`` export what users need, and importing is cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pacore
import pacore.eval


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
