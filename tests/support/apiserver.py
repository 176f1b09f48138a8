"""The api-server under test: served for real by ``serve_api_server`` on 127.0.0.1 (a port
bound first, so the dev identity provider can be told the redirect URI), logged in through
the real provider by a headless browser (an httpx client with a cookie jar)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from hypercorn.config import Sockets

from support.oidcprovider import RunningProvider, login_at_provider
from visiona_services.api_server import ApiConfig, RunningApiServer, serve_api_server
from visiona_services.api_server.server import listen

SESSION_SECRET = "test-session-secret-0123456789abcdef0123456789"
INTERNAL_SECRET = "test-internal-secret-0123456789abcdef012345678"
STORAGE_SECRET = "test-storage-secret-0123456789abcdef0123456789"
#: Bounds one step of a test (a login, a start, a stop).
STEP_TIMEOUT = 20.0
#: What every unsafe request of a logged-in browser carries.
CSRF = {"X-CSRF": "1"}


def base_config(database_url: str, data_dir: Path, **overrides: Any) -> ApiConfig:
    """The api-server's configuration in tests (port and provider filled in later); local
    state (the model store) under ``data_dir``."""
    values: dict[str, Any] = {
        "data_dir": str(data_dir),
        "storage_signing_secret": STORAGE_SECRET,
        "host": "127.0.0.1",
        "port": 0,
        "database_url": database_url,
        "session_secret": SESSION_SECRET,
        "internal_secret": INTERNAL_SECRET,
        "oidc_issuer": "http://127.0.0.1:9",
        "oidc_client_id": "visiona-web",
        "proxy_internal_url": "http://127.0.0.1:9",
        "db_threads": 4,
        "log_level": "warning",
    }
    values.update(overrides)
    return ApiConfig(**values)


def bind(config: ApiConfig) -> tuple[Sockets, str]:
    """Bound sockets for ``config`` and the URL they answer at."""
    _, sockets = listen(config)
    host, port = sockets.insecure_sockets[0].getsockname()[:2]
    return sockets, f"http://{host}:{port}"


@attrs.define
class FakeClock:
    """The api-server's notion of now, moved by tests (session and login lifetimes)."""

    now: datetime = attrs.field(factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@attrs.define(eq=False)
class Api:
    """One running api-server, its provider, and the URL it answers at."""

    url: str
    config: ApiConfig
    server: RunningApiServer
    provider: RunningProvider | None
    clock: FakeClock
    _nursery: trio.Nursery
    #: Set when the running server has returned.
    _done: trio.Event

    async def restart(self) -> None:
        """Stop the server gracefully and start a new one on the same database and port
        (what is in memory is lost; what is in the database must not be)."""
        self.server.stop()
        with trio.fail_after(STEP_TIMEOUT):
            await self._done.wait()
        sockets, url = bind(attrs.evolve(self.config, port=int(self.url.rsplit(":", 1)[1])))
        assert url == self.url
        self._done = trio.Event()
        self.server = await _start(self._nursery, self.config, sockets, self._done, self.clock)

    def browser(self, **options: Any) -> httpx.AsyncClient:
        """A new browser (own cookie jar), aimed at the api-server."""
        return httpx.AsyncClient(base_url=self.url, follow_redirects=False, **options)

    async def start_login(self, browser: httpx.AsyncClient, next_path: str | None = None) -> str:
        """``GET /api/auth/login``; returns the provider's authorization URL."""
        params = {"next": next_path} if next_path is not None else {}
        response = await browser.get("/api/auth/login", params=params)
        assert response.status_code == 302, response.text
        return response.headers["location"]

    async def login(
        self, browser: httpx.AsyncClient, username: str, next_path: str | None = None
    ) -> httpx.Response:
        """The whole login; returns the callback's answer (302 to ``next`` when it worked)."""
        with trio.fail_after(STEP_TIMEOUT):
            authorize = await self.start_login(browser, next_path)
            callback = await login_at_provider(browser, authorize, username)
            return await browser.get(callback)


async def _serve(
    config: ApiConfig,
    sockets: Sockets,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[RunningApiServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await serve_api_server(config, sockets=sockets, task_status=task_status)
    finally:
        done.set()


async def _start(
    nursery: trio.Nursery, config: ApiConfig, sockets: Sockets, done: trio.Event, clock: FakeClock
) -> RunningApiServer:
    with trio.fail_after(STEP_TIMEOUT):
        server: RunningApiServer = await nursery.start(_serve, config, sockets, done)
    server.services.clock = clock
    return server


@asynccontextmanager
async def running_api(
    config: ApiConfig,
    sockets: Sockets,
    url: str,
    provider: RunningProvider | None,
    clock: FakeClock | None = None,
) -> AsyncIterator[Api]:
    """Serve ``config`` on ``sockets`` for the block; stop it (gracefully) after."""
    clock = clock or FakeClock()
    async with trio.open_nursery() as nursery:
        done = trio.Event()
        api = Api(
            url,
            config,
            await _start(nursery, config, sockets, done, clock),
            provider,
            clock,
            nursery,
            done,
        )
        try:
            yield api
        finally:
            api.server.stop()
