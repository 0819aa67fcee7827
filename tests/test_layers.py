"""Import layering, checked over the source (every import statement, those inside functions too).

Lower layers never import upper ones: the library (engine, backends, trace,
eval, store, progress...) imports neither front door (``pacore.cli``,
``pacore.server``) nor the terminal toolkits the CLI uses (rich, typer); the
server never imports the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "pacore"

#: The front doors: everything else under pacore/ is the library they share.
FRONT_DOORS = ("pacore.cli", "pacore.server", "pacore.__main__")

LIBRARY_MUST_NOT_IMPORT = ("pacore.cli", "pacore.server", "rich", "typer")
SERVER_MUST_NOT_IMPORT = ("pacore.cli", "rich", "typer")

#: Known exceptions, each with why it stands; remove an entry when its import goes.
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved to absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            # ``from pacore import cli`` imports the module pacore.cli.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def violations(sources: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module_name(path)} imports {imported}"
        for path in sources
        for imported in imported_modules(path)
        if within(imported, forbidden)
        and not any(module_name(path) == module and within(imported, (allowed,)) for module, allowed in ALLOWED)
    )


SOURCES = sorted(PACKAGE.rglob("*.py"))
LIBRARY = [p for p in SOURCES if not within(module_name(p), FRONT_DOORS)]
SERVER = [p for p in SOURCES if within(module_name(p), ("pacore.server",))]


def test_the_sources_are_found() -> None:
    names = {module_name(p) for p in SOURCES}
    assert {"pacore.engine", "pacore.progress", "pacore.server.completions", "pacore.cli.main"} <= names
    assert "pacore.engine" in {module_name(p) for p in LIBRARY}
    assert "pacore.server.completions" in {module_name(p) for p in SERVER}


def test_the_library_imports_no_front_door_and_no_terminal_toolkit() -> None:
    assert violations(LIBRARY, LIBRARY_MUST_NOT_IMPORT) == []


def test_the_server_never_imports_the_cli() -> None:
    assert violations(SERVER, SERVER_MUST_NOT_IMPORT) == []


def test_every_allowed_exception_still_exists() -> None:
    # An exception whose import is gone must leave the list, so it cannot hide a new one.
    by_name = {module_name(p): p for p in SOURCES}
    for module, allowed in ALLOWED:
        assert any(within(imported, (allowed,)) for imported in imported_modules(by_name[module])), (module, allowed)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import rich.console\n", {"rich.console"}),
        ("from pacore import cli\n", {"pacore", "pacore.cli"}),
        (
            "def later():\n    from ..cli.progress import ProgressState\n",
            {"pacore.cli.progress", "pacore.cli.progress.ProgressState"},
        ),
        ("from . import errors\n", {"pacore.server", "pacore.server.errors"}),
    ],
)
def test_the_check_sees_every_form_of_import(tmp_path: Path, source: str, expected: set[str], monkeypatch) -> None:
    # A file posing as pacore/server/probe.py: relative imports resolve from pacore.server.
    fake_src = tmp_path / "src"
    probe = fake_src / "pacore" / "server" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(source, encoding="utf-8")
    monkeypatch.setitem(globals(), "SRC", fake_src)
    assert imported_modules(probe) == expected
    assert bool(violations([probe], SERVER_MUST_NOT_IMPORT)) == within_any(expected, SERVER_MUST_NOT_IMPORT)


def within_any(modules: set[str], prefixes: tuple[str, ...]) -> bool:
    return any(within(module, prefixes) for module in modules)
