"""Command-line flags declared on the settings they set.

A settings class (a dataclass or a pydantic model) marks each field a command
line may set as ``Annotated[type, Flag(...)]``; :mod:`pacore.cli.options` builds
the command's options from those fields. A setting's flag, help, bounds and
default are so written once, beside the setting. A :class:`Flag` is plain
data: the layers that declare settings never import the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Flag:
    """How a command line sets one field: ``name METAVAR``, described by ``help`` in ``--help``."""

    name: str
    help: str
    metavar: str | None = None
    #: The smallest value the command line accepts (``--help`` shows it as ``[x>=min]``).
    min: float | None = None
    #: The default as ``--help`` shows it, where the value itself would read badly ("8 MiB").
    default_text: str | None = None
