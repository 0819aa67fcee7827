"""Command-line flags declared on the settings they set.

A settings class (a dataclass or a pydantic model) marks each field a command
line may set as ``Annotated[type, Flag(...)]``; :mod:`pacore.cli.options` builds
the command's options from those fields. A setting's flag, help, bounds and
default are so written once, beside the setting. A :class:`Flag` is plain
data: the layers that declare settings never import the CLI.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, get_args, get_type_hints

from pacore.errors import UsageError


@dataclass(frozen=True, slots=True)
class Flag:
    """How a command line sets one field: ``name METAVAR``, described by ``help`` in ``--help``."""

    name: str
    help: str
    metavar: str | None = None
    #: The smallest value the command line accepts (``--help`` shows it as ``[x>=min]``); see :meth:`check`.
    min: float | None = None
    #: The default as ``--help`` shows it, where the value itself would read badly ("8 MiB").
    default_text: str | None = None

    def check(self, field: str, value: float | None) -> None:
        """Refuse ``value`` below :attr:`min`, naming ``field``: the bound holds off the command line too.

        ``None`` (an optional setting left unset) has no bound to hold.
        """
        if self.min is not None and value is not None and not value >= self.min:  # NaN is refused as well
            bound = "0 or more" if self.min == 0 else f"at least {self.min:g}"
            shown = f"{value:g}" if isinstance(value, float) else value
            raise UsageError(f"{field} must be {bound}, got {shown}")


@functools.cache
def declared_flags(settings: type) -> tuple[tuple[str, Any, Flag], ...]:
    """The fields of ``settings`` declared with a :class:`Flag`, in order: (name, type, flag) each.

    Base classes' fields are included.
    """
    found = []
    for name, hint in get_type_hints(settings, include_extras=True).items():
        flags = [extra for extra in getattr(hint, "__metadata__", ()) if isinstance(extra, Flag)]
        if flags:
            found.append((name, get_args(hint)[0], flags[0]))
    return tuple(found)
