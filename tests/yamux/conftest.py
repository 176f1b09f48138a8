"""Fixtures for the yamux tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .helpers import Transports, memory_transports, tcp_transports


@pytest.fixture(params=["memory", "tcp", "tcp_reversed"])
async def transport_pair(request: pytest.FixtureRequest) -> AsyncIterator[Transports]:
    """Connected transport ends, like hashicorp's ``testConnTypes`` (Pipes, TCP, TCP_Reverse)."""
    if request.param == "memory":
        transports = memory_transports()
    else:
        transports = await tcp_transports(reversed_roles=request.param == "tcp_reversed")
    try:
        yield transports
    finally:
        await transports.client.aclose()
        await transports.server.aclose()
