"""Optional dependencies: the one place that turns a missing one into the extra to install.

``pip install pacore`` is the client and engine; the embedded model, the server, the
evaluation graders and figures, parquet and training are extras (see pyproject.toml).
"""

from __future__ import annotations

import importlib

from pacore.errors import MissingExtraError

#: What ``pacore serve`` and ``pacore view`` import.
SERVER_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def require(extra: str, *modules: str, feature: str) -> None:
    """Import ``modules``; if one is not installed, say that ``feature`` needs ``pacore[extra]``.

    An import error from inside an installed package (a broken build, a missing
    transitive dependency) is not a missing extra and propagates unchanged.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if (exc.name or "").split(".")[0] != module.split(".")[0]:
                raise
            raise MissingExtraError(f"{feature} needs the '{extra}' extra: pip install 'pacore[{extra}]'") from None
