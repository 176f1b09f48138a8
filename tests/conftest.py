"""Fixtures shared by the tunnel tests (``tests/`` and every folder below it)."""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator

import pytest
import trio
from support.missing import missing
from support.oidcprovider import require_devidp
from support.postgres import INSTALL_HINT, PostgresUnavailable, create_database, postgres_server
from support.tunnelhttp import LocalServer, start_local_server


@pytest.fixture
async def local(nursery: trio.Nursery) -> LocalServer:
    """The agent's local server: ``support.tunnelhttp.LocalApp`` named ``local-1`` (its
    ``/hello`` answers ``hello from local-1``) on 127.0.0.1, a free port."""
    return await start_local_server(nursery, "local-1")


@pytest.fixture(scope="session")
def devidp() -> str:
    """The node binary for ``support.oidcprovider.start_oidc_provider``. Without node or
    ``devidp/node_modules`` the test is skipped, saying so; with ``CI=true`` it fails."""
    return require_devidp()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of an empty database on a PostgreSQL server for the whole run
    (``support.postgres.postgres_server``: one of its own, or ``$VISIONA_TEST_POSTGRES_URL``).
    Without PostgreSQL the test is skipped; with ``CI=true`` it fails."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(postgres_server())
        except PostgresUnavailable as exc:
            missing(f"the test needs PostgreSQL: {exc}", INSTALL_HINT)
        yield url


@pytest.fixture(scope="module")
def module_database_url(postgres_url: str, request: pytest.FixtureRequest) -> str:
    """SQLAlchemy URL of a database made afresh for the test module, on ``postgres_url``'s
    server."""
    module = request.module.__name__
    # Readable, unique per module, and within PostgreSQL's 63 bytes.
    digest = hashlib.sha256(module.encode()).hexdigest()[:8]
    readable = re.sub(r"[^a-z0-9]+", "_", module.rsplit(".", 1)[-1].lower())[:40]
    return create_database(postgres_url, f"t_{readable}_{digest}")
