"""``pacore serve``: an OpenAI-compatible PaCoRe endpoint with a live trace viewer.

::

    from pacore.server import ServerConfig, create_app
    app = create_app(ServerConfig(schedule=Schedule.parse("low")), open_backend())
"""

from pacore.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
