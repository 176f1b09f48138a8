"""The services' console scripts, importable without the ``services`` extra: without it,
``visiona-remote-proxy`` and ``visiona-api-server`` say so in one line (exit 2) instead of
an ImportError's traceback. The library alone installs with ``pip install visiona-tunnel``;
the services need ``pip install 'visiona-tunnel[services]'``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["api_server", "remote_proxy"]

#: The top-level modules of the ``services`` extra (pyproject.toml).
SERVICES_MODULES = frozenset(
    {
        "alembic",
        "authlib",
        "boto3",
        "botocore",
        "cattrs",
        "httpx",
        "hypercorn",
        "joserfc",
        "prometheus_client",
        "psycopg",
        "quart",
        "quart_trio",
        "sqlalchemy",
        "trio_websocket",
    }
)


def _run(prog: str, load: Callable[[], Callable[[], int]]) -> int:
    try:
        main = load()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVICES_MODULES:
            raise
        print(
            f"{prog}: the services extra is not installed ({exc.name} is missing): "
            "pip install 'visiona-tunnel[services]'",
            file=sys.stderr,
        )
        return 2
    return main()


def _remote_proxy_main() -> Callable[[], int]:
    from .remote_proxy.__main__ import main

    return main


def _api_server_main() -> Callable[[], int]:
    from .api_server.__main__ import main

    return main


def remote_proxy() -> int:
    return _run("visiona-remote-proxy", _remote_proxy_main)


def api_server() -> int:
    return _run("visiona-api-server", _api_server_main)
