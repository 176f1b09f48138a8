"""Fixtures of the api-server tests: a database of each kind, the dev identity provider,
and the api-server served for real between them (``support.apiserver``)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypercorn.config import Sockets
from support.apiserver import Api, FakeClock, base_config, bind, running_api
from support.missing import missing
from support.oidcprovider import RunningProvider, start_oidc_provider
from support.postgres import create_database
from support.rclone import INSTALL_HINT as RCLONE_HINT
from support.rclone import RcloneS3, find_rclone, rclone_serve_s3
from support.system import System, open_system

from visiona_services.api_server import ApiConfig


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: a SQLite file, or a new database on the test PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'api.db'}"
    server: str = request.getfixturevalue("postgres_url")
    return create_database(server, f"api_{uuid.uuid4().hex[:16]}")


@attrs.frozen
class Stack:
    """An api-server configuration bound to its port, and the dev provider it is
    registered at (redirect, back-channel logout and post-logout URIs)."""

    config: ApiConfig
    sockets: Sockets
    url: str
    provider: RunningProvider


async def start_stack(
    nursery: trio.Nursery, database_url: str, data_dir: Path, **overrides: Any
) -> Stack:
    sockets, url = bind(base_config(database_url, data_dir))
    provider = await start_oidc_provider(
        nursery,
        redirect_uris=[f"{url}/api/auth/callback"],
        backchannel_logout_uri=f"{url}/api/auth/backchannel-logout",
        post_logout_redirect_uris=[f"{url}/"],
    )
    config = base_config(
        database_url,
        data_dir,
        public_url=url,
        oidc_issuer=provider.issuer,
        oidc_client_id=provider.client_id,
        **overrides,
    )
    return Stack(config, sockets, url, provider)


@pytest.fixture
async def stack(nursery: trio.Nursery, database_url: str, tmp_path: Path) -> Stack:
    return await start_stack(nursery, database_url, tmp_path)


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Api]:
    """The api-server on a fresh database, served for the test."""
    async with running_api(
        stack.config, stack.sockets, stack.url, stack.provider, FakeClock()
    ) as running:
        yield running


@pytest.fixture
async def system(nursery: trio.Nursery, database_url: str, tmp_path: Path) -> AsyncIterator[System]:
    """The remote-proxy, the api-server and the dev provider wired together
    (``support.system``); pair devices and start agents with it."""
    async with open_system(nursery, database_url, tmp_path) as running:
        yield running


@pytest.fixture(scope="session")
def rclone_s3() -> Iterator[RcloneS3]:
    """``rclone serve s3`` for the run (``support.rclone``): an S3 server that checks
    signatures. Without rclone the test skips (with ``CI=true``: fails)."""
    binary, reason = find_rclone()
    if binary is None:
        missing(f"the S3 tests need rclone >= 1.65 ({reason})", RCLONE_HINT)
    with rclone_serve_s3(binary) as server:
        yield server
