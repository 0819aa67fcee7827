"""Shared fixtures. Keep each small; helpers live in their own modules."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis times each example against a 200 ms deadline and its data generation against its own
# limit, both on the wall clock: on a loaded machine either can run out, and Hypothesis then fails
# the test ("Unreliable test timings", "too_slow"). No property test here is about speed (those that
# are measure CPU time themselves), so neither check is kept; a @settings(...) on a test builds on this.
settings.register_profile("pacore", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pacore")

# The embedded model's context in the tests (PACORE_N_CTX, read by every model load, in this process
# and in the pacore commands and servers it starts): the prompts of the model tests are a few
# hundred tokens, and the default 16,384 doubles a load's CPU time and adds 200 MB per process.
os.environ.setdefault("PACORE_N_CTX", "4096")

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


@pytest.fixture(scope="session", autouse=True)
def patient_math_verify() -> Iterator[None]:
    """math-verify's timeout in the main thread (5 s, SIGALRM: wall time) is 30 s in the tests.

    On a loaded machine 2 s of wall time can run out in sympy's first comparison, and a right
    answer is graded wrong (a run under load saw it for (x+1)^2 = x^2+2x+1). The tests check what is equal,
    not how fast; a test of the timeout itself sets ``grading._VERIFY_TIMEOUT_S`` back.
    """
    from pacore.eval import grading

    grading._VERIFY_TIMEOUT_S, saved = 30, grading._VERIFY_TIMEOUT_S
    yield
    grading._VERIFY_TIMEOUT_S = saved


@pytest.fixture(scope="session")
def llama_server_url() -> Iterator[str]:
    """Base URL (``http://127.0.0.1:PORT/v1``) of a real llama-cpp-python server
    serving the embedded GGUF, shared by the whole session."""
    from llama_server import llama_server
    from pacore.backends.llama_cpp import default_model_path

    with llama_server(default_model_path()) as url:
        yield url


#: Fixtures that serve the real embedded model: a test using one is a model test, marked or not.
MODEL_FIXTURES = frozenset({"llama_server_url", "small_context_url"})


#: Scopes whose fixtures a worker of ``pytest -n N --dist loadgroup`` should set up once, not once per worker.
SHARED_SCOPES = frozenset({"module", "package", "class"})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests that use a model fixture ``model``, so ``-m "not model"`` (the unit lane) skips them.

    Under pytest-xdist (``make test``: ``-n N --dist loadgroup``) each worker sets up the fixtures its
    tests need: the tests that share the session's llama.cpp server, and a module's tests that share
    one of its module-scoped fixtures (a server, a browser, a training run), go to one worker
    (an ``xdist_group``), so each is started once in the whole run.
    """
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if MODEL_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.model)
        if "llama_server_url" in fixtures:
            item.add_marker(pytest.mark.xdist_group("llama_server"))
        elif any(scope in SHARED_SCOPES for scope in _fixture_scopes(item)):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    _slowest_modules_first(items)
    if config.getoption("loadgroup", False):  # set in pytest-xdist's workers under --dist loadgroup
        _name_groups(items)


def _slowest_modules_first(items: list[pytest.Item]) -> None:
    """Order the modules that train, run the embedded model or hold a ``slow`` test before the rest, each
    module kept whole.

    pytest-xdist hands out tests in this order: a training run or a documentation example that runs
    the model for minutes, started last, would keep one worker busy long after the others are done.
    """

    def weight(item: pytest.Item) -> int:
        if item.get_closest_marker("train"):
            return 0
        if item.get_closest_marker("model") or item.nodeid.startswith("tests/test_doc_examples.py"):
            return 1
        return 2 if item.get_closest_marker("slow") else 3

    modules: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        modules[module] = min(modules.get(module, 3), weight(item))
    items.sort(key=lambda item: modules[item.nodeid.split("::")[0]])  # stable: a module's own order stays


def _name_groups(items: list[pytest.Item]) -> None:
    """Suffix each grouped test's node id with ``@GROUP``, which tells pytest-xdist's scheduler its group.

    pytest-xdist 3.8 does it by setting ``item._nodeid``, which pytest 9.2 no longer reads (the
    node id became the structured ``item._id``), so without this every group is silently ignored.
    """
    from _pytest.nodeid import NodeId

    for item in items:
        groups = sorted({str(mark.args[0]) for mark in item.iter_markers("xdist_group") if mark.args})
        if groups and hasattr(item, "_id") and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")


def _fixture_scopes(item: pytest.Item) -> list[str]:
    """The scopes of the fixtures ``item`` uses (pytest has no public API for them)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    return [definitions[-1].scope for definitions in info.name2fixturedefs.values() if definitions]
