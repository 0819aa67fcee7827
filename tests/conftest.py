"""Shared fixtures. Keep each small; helpers live in their own modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The project's shared test data lives beside the repository, never inside it.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Callable[[str], Path]:
    """``shared_data("gsm8k_test_1000.jsonl")``: that file's path; skips the test if it is absent."""

    def path_of(name: str) -> Path:
        path = SHARED_DATA / name
        if not path.is_file():
            pytest.skip(f"shared data file {path} is absent")
        return path

    return path_of


@pytest.fixture(scope="session")
def llama_server_url() -> Iterator[str]:
    """Base URL (``http://127.0.0.1:PORT/v1``) of a real llama-cpp-python server
    serving the embedded GGUF, shared by the whole session."""
    from llama_server import llama_server
    from pacore.backends.llama_cpp import default_model_path

    with llama_server(default_model_path()) as url:
        yield url
