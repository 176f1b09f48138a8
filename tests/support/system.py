"""The whole system under test: the remote-proxy (verifying device tokens with the
api-server), the api-server (registered at its own dev provider), and agents paired
through the real flow (pairing token -> exchange -> device token) serving local servers.

::

    async with open_system(nursery, database_url, tmp_path) as system:
        async with system.api.browser() as browser:
            await system.api.login(browser, "alice")
            device = await system.pair(browser, "cam")
            agent = await system.start_agent(nursery, device, local.port)
            await system.wait_online(device.device_id)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import trio

from support.apiserver import (
    CSRF,
    INTERNAL_SECRET,
    STEP_TIMEOUT,
    Api,
    base_config,
    bind,
    running_api,
)
from support.oidcprovider import RunningProvider, start_oidc_provider
from support.pyagent import FAST, PyAgent, start_py_agent
from visiona_services.remote_proxy.config import ProxyConfig
from visiona_services.remote_proxy.service import RunningProxy, serve_remote_proxy
from visiona_tunnel.client import ClientConfig


@attrs.frozen
class PairedDevice:
    device_id: str
    device_token: str
    relay_url: str


def proxy_config(api_url: str, **environ: str) -> ProxyConfig:
    """The remote-proxy on 127.0.0.1 (free ports), verifying tokens with ``api_url``."""
    return ProxyConfig.from_env(
        {
            "VISIONA_TUNNEL_HOST": "127.0.0.1",
            "VISIONA_TUNNEL_PORT": "0",
            "VISIONA_PROXY_INTERNAL_HOST": "127.0.0.1",
            "VISIONA_PROXY_INTERNAL_PORT": "0",
            "VISIONA_INTERNAL_SECRET": INTERNAL_SECRET,
            "VISIONA_API_INTERNAL_URL": api_url,
            "VISIONA_PROXY_EVENTS_HEARTBEAT": "1",
            "VISIONA_LOG_LEVEL": "warning",
            **environ,
        }
    )


@attrs.define(eq=False)
class System:
    api: Api
    proxy: RunningProxy
    provider: RunningProvider
    #: Starts (and restarts) the remote-proxy on its first ports.
    _proxy_nursery: trio.Nursery
    _proxy_config: ProxyConfig
    #: Set when the running remote-proxy has returned.
    _proxy_done: trio.Event

    async def restart_proxy(self) -> None:
        """Stop the remote-proxy (its tunnels close, agents redial) and start a new one on
        the same ports."""
        self.proxy.stop()
        with trio.fail_after(STEP_TIMEOUT):
            await self._proxy_done.wait()
        tunnel, internal = (
            _port(u) for u in (self.proxy.tunnel_urls[0], self.proxy.internal_urls[0])
        )
        config = attrs.evolve(self._proxy_config, tunnel_port=tunnel, internal_port=internal)
        self._proxy_done = trio.Event()
        self.proxy = await self._proxy_nursery.start(_serve_proxy, config, self._proxy_done)

    @property
    def relay_url(self) -> str:
        return self.proxy.tunnel_urls[0].replace("http://", "ws://") + "/tunnel/connect"

    async def pair(self, browser: httpx.AsyncClient, name: str = "cam") -> PairedDevice:
        """A pairing token of ``browser``'s user, traded at the exchange as an agent does."""
        created = await browser.post("/api/pairing/token", json={"name": name}, headers=CSRF)
        assert created.status_code == 201, created.text
        async with self.api.browser() as agent:
            exchanged = await agent.post(
                "/api/pairing/exchange", json={"token": created.json()["data"]["token"]}
            )
        assert exchanged.status_code == 200, exchanged.text
        data = exchanged.json()["data"]
        return PairedDevice(data["device_id"], data["device_token"], data["relay_url"])

    async def start_agent(
        self,
        nursery: trio.Nursery,
        device: PairedDevice,
        local_port: int,
        *,
        config: ClientConfig = FAST,
    ) -> PyAgent:
        """Our agent for ``device``, dialling the relay URL the exchange gave it."""
        return await start_py_agent(
            nursery, device.relay_url, device.device_token, local_port, config=config
        )

    async def wait_online(self, device_id: str, online: bool = True) -> None:
        """Until the api-server sees the device online (or offline)."""
        with trio.fail_after(STEP_TIMEOUT):
            await self.api.server.services.presence.wait_until_online(device_id, online)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _serve_proxy(
    config: ProxyConfig,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[RunningProxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await serve_remote_proxy(config, task_status=task_status)
    finally:
        done.set()


@asynccontextmanager
async def open_system(
    nursery: trio.Nursery, database_url: str, data_dir: Path
) -> AsyncIterator[System]:
    """Start it all; stop the api-server and the remote-proxy after the block (the
    provider and agents end with ``nursery``)."""
    sockets, api_url = bind(base_config(database_url, data_dir))
    async with trio.open_nursery() as proxy_nursery:
        config_of_proxy = proxy_config(api_url)
        done = trio.Event()
        proxy: RunningProxy = await proxy_nursery.start(_serve_proxy, config_of_proxy, done)
        provider = await start_oidc_provider(
            nursery,
            redirect_uris=[f"{api_url}/api/auth/callback"],
            backchannel_logout_uri=f"{api_url}/api/auth/backchannel-logout",
            post_logout_redirect_uris=[f"{api_url}/"],
        )
        tunnel_port = proxy.tunnel_urls[0].rsplit(":", 1)[1]
        config = base_config(
            database_url,
            data_dir,
            public_url=api_url,
            oidc_issuer=provider.issuer,
            oidc_client_id=provider.client_id,
            proxy_internal_url=proxy.internal_urls[0],
            tunnel_public_url=f"ws://127.0.0.1:{tunnel_port}/tunnel/connect",
        )
        try:
            async with running_api(config, sockets, api_url, provider) as api:
                system = System(api, proxy, provider, proxy_nursery, config_of_proxy, done)
                try:
                    yield system
                finally:
                    system.proxy.stop()  # the one running now (restart_proxy replaces it)
        finally:
            proxy.stop()  # setting an event: harmless when it has stopped already
