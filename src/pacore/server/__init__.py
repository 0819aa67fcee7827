"""``pacore serve``: an OpenAI-compatible PaCoRe endpoint with a live trace viewer.

::

    from pacore.server import ServerConfig, create_app
    app = create_app(ServerConfig(schedule=Schedule.parse("low")), open_backend())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pacore.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    # Loaded on first use, so pacore.server.settings (what the CLI declares pacore serve's
    # flags from) imports without the server extra's packages.
    if name in __all__:
        from pacore.server import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
