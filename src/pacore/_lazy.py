"""Names a module imports on first use (PEP 562), so importing the module stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_attributes(module: str, sources: Mapping[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``module``: each name of ``sources`` comes from the
    module it maps to, imported on first use; any other name is an AttributeError as usual."""

    def __getattr__(name: str) -> object:
        if name in sources:
            return getattr(importlib.import_module(sources[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
