"""Devices' live state end to end: a paired agent dials the real remote-proxy (which
verifies its token with the api-server); the api-server follows the proxy's tunnel events
and tells the owner."""

from __future__ import annotations

import json

import httpx
import trio
from support.apiserver import CSRF, STEP_TIMEOUT
from support.system import System
from support.tunnelhttp import LocalServer, browser_websocket


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _cookie(browser: httpx.AsyncClient) -> tuple[str, str]:
    return ("Cookie", f"visiona_session={browser.cookies['visiona_session']}")


async def test_a_paired_agent_shows_online_with_its_tunnel(
    nursery: trio.Nursery, system: System, local: LocalServer
) -> None:
    async with system.api.browser() as browser:
        await system.api.login(browser, "alice")
        device = await system.pair(browser)
        await system.start_agent(nursery, device, local.port)
        await system.wait_online(device.device_id)
        [listed] = (await browser.get("/api/devices")).json()["data"]
        status = (await browser.get("/api/pairing/status")).json()["data"]
    assert listed["id"] == device.device_id and listed["online"] is True
    assert listed["connected_since"].endswith("Z")
    assert listed["remote_address"].startswith("127.0.0.1:")
    assert listed["last_seen_at"] is not None
    assert status["connected"] is True


async def test_the_feed_sees_the_device_come_and_go(
    nursery: trio.Nursery, system: System, local: LocalServer
) -> None:
    async with system.api.browser() as browser:
        await system.api.login(browser, "alice")
        device = await system.pair(browser)
        with trio.fail_after(STEP_TIMEOUT):
            async with browser_websocket(
                _port(system.api.url), "/api/events", [_cookie(browser)]
            ) as feed:
                agent = await system.start_agent(nursery, device, local.port)
                online = json.loads(await feed.get_message())
                agent.client.stop()
                offline = json.loads(await feed.get_message())
    assert (online["type"], online["device_id"]) == ("device.online", device.device_id)
    assert (offline["type"], offline["device_id"]) == ("device.offline", device.device_id)


async def test_unpairing_closes_the_tunnel_and_the_redial_is_refused(
    nursery: trio.Nursery, system: System, local: LocalServer
) -> None:
    async with system.api.browser() as browser:
        await system.api.login(browser, "alice")
        device = await system.pair(browser)
        agent = await system.start_agent(nursery, device, local.port)
        await agent.hooks.wait_for("session_up")
        await system.wait_online(device.device_id)
        await browser.delete(f"/api/devices/{device.device_id}", headers=CSRF)
        await agent.hooks.wait_for("session_down")
        _, _, refusal = await agent.hooks.wait_for("dial_failed")
    assert "401" in str(refusal)
    assert system.proxy.state.tunnels.get(device.device_id) is None


async def test_devices_come_back_online_after_a_remote_proxy_restart(
    nursery: trio.Nursery, system: System, local: LocalServer
) -> None:
    async with system.api.browser() as browser:
        await system.api.login(browser, "alice")
        device = await system.pair(browser)
        agent = await system.start_agent(nursery, device, local.port)
        await system.wait_online(device.device_id)
        await system.restart_proxy()
        await system.wait_online(device.device_id, online=False)
        await agent.hooks.wait_for("session_down")
        await system.wait_online(device.device_id)
        [listed] = (await browser.get("/api/devices")).json()["data"]
    assert listed["online"] is True


async def test_an_api_server_restart_keeps_devices_and_finds_them_online(
    nursery: trio.Nursery, system: System, local: LocalServer
) -> None:
    async with system.api.browser() as browser:
        await system.api.login(browser, "alice")
        device = await system.pair(browser)
        await system.start_agent(nursery, device, local.port)
        await system.wait_online(device.device_id)
        await system.api.restart()
        await system.wait_online(device.device_id)  # rebuilt from the snapshot
        [listed] = (await browser.get("/api/devices")).json()["data"]
    assert (listed["id"], listed["online"]) == (device.device_id, True)
