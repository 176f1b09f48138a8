"""Fixtures shared by the tunnel tests (``tests/`` and every folder below it)."""

from __future__ import annotations

import pytest
import trio
from support.tunnelhttp import LocalServer, start_local_server


@pytest.fixture
async def local(nursery: trio.Nursery) -> LocalServer:
    """The agent's local server: ``support.tunnelhttp.LocalApp`` named ``local-1`` (its
    ``/hello`` answers ``hello from local-1``) on 127.0.0.1, a free port."""
    return await start_local_server(nursery, "local-1")
