"""The seed's Go agent (gorilla/websocket + hashicorp/yamux) paired the Go prototype's way:
a device token fetched from the exchange with a plain HTTP POST (as ``curl`` would), given
to ``goagent -token``. It comes online at the api-server and is refused once unpaired."""

from __future__ import annotations

import pytest
import trio
from interop import conftest as interop_conftest
from interop.tunnelpeers import TunnelPeerBinaries, start_go_agent
from support.apiserver import CSRF, STEP_TIMEOUT
from support.data import pattern_body, pattern_sha256
from support.devicepath import start_device_server
from support.system import System
from support.tunnelhttp import LocalServer

pytestmark = pytest.mark.interop

#: The Go peers, built once per run: skipped locally without Go, a failure with CI=true.
tunnel_peers = interop_conftest.tunnel_peers


async def test_the_go_agent_pairs_by_curl_and_comes_online(
    nursery: trio.Nursery, system: System, tunnel_peers: TunnelPeerBinaries, local: LocalServer
) -> None:
    async with system.api.browser() as browser:
        await system.api.login(browser, "alice")
        device = await system.pair(browser, "go camera")
        agent = await start_go_agent(
            nursery,
            tunnel_peers,
            relay_url=device.relay_url,
            token=device.device_token,
            local=local.address,
        )
        with trio.fail_after(STEP_TIMEOUT):
            await agent.expect_online()
        await system.wait_online(device.device_id)
        [listed] = (await browser.get("/api/devices")).json()["data"]
        assert (listed["name"], listed["online"]) == ("go camera", True)
        await browser.delete(f"/api/devices/{device.device_id}", headers=CSRF)
        await system.wait_online(device.device_id, online=False)
    assert system.proxy.state.tunnels.get(device.device_id) is None


async def test_browsers_reach_the_go_agents_device_through_the_api_server(
    nursery: trio.Nursery, system: System, tunnel_peers: TunnelPeerBinaries
) -> None:
    device_server = await start_device_server(nursery)
    size = 8 << 20
    async with system.api.browser() as browser:
        await system.api.login(browser, "alice")
        device = await system.pair(browser, "go camera")
        agent = await start_go_agent(
            nursery,
            tunnel_peers,
            relay_url=device.relay_url,
            token=device.device_token,
            local=f"127.0.0.1:{device_server.port}",
        )
        with trio.fail_after(STEP_TIMEOUT):
            await agent.expect_online()
        await system.wait_online(device.device_id)
        with trio.fail_after(STEP_TIMEOUT):
            hello = await browser.get("/api/cameras/hello?x=1")
            uploaded = await browser.post(
                "/api/inference/sha256",
                content=pattern_body(size),
                headers={**CSRF, "Content-Length": str(size)},
            )
    assert hello.status_code == 200 and hello.text == "hello from local-1"
    assert uploaded.text == f"{size} {pattern_sha256(size)}"
