"""griffe extension for the API reference: Sphinx roles in docstrings become cross-references.

The docstrings name objects as Sphinx does (:class:`~pacore.trace.Result`); mkdocstrings renders
Markdown, where a role would print literally. Each becomes an optional autoref: a link where its
target is documented, the name in code font where it is not (no warning either way).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|exc|data|obj):`(~?)([\w.]+)`")


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is not None and ":`" in docstring.value:
            docstring.value = _ROLE.sub(lambda role: _reference(obj, role[1] == "~", role[2]), docstring.value)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self.on_object(obj=pkg)  # on_object is called for members only, not for the package itself


def _reference(obj: griffe.Object, short: bool, name: str) -> str:
    """An autoref to ``name`` as seen from ``obj`` (dotted names are taken as written)."""
    try:
        identifier = name if "." in name else obj.resolve(name)
    except griffe.NameResolutionError:
        identifier = name
    text = name.rsplit(".", 1)[-1] if short else name
    return f'<autoref identifier="{identifier}" optional><code>{text}</code></autoref>'
