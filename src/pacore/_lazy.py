"""Names a module imports on first use (PEP 562), so importing the module stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping


def lazy_attributes(module: str, names_by_module: Mapping[str, Iterable[str]]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``module``: each name listed in ``names_by_module`` comes from the
    module it is listed under, imported on first use; any other name is an AttributeError as usual."""
    sources = {name: source for source, names in names_by_module.items() for name in names}

    def __getattr__(name: str) -> object:
        if name in sources:
            return getattr(importlib.import_module(sources[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
