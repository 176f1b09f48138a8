"""``WS /api/events``: the owner's realtime feed of their devices."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from support.apiserver import CSRF, STEP_TIMEOUT, Api
from support.tunnelhttp import browser_websocket, websocket_handshake
from trio_websocket import ConnectionClosed


def _port(api: Api) -> int:
    return int(api.url.rsplit(":", 1)[1])


def _cookie(browser: httpx.AsyncClient) -> tuple[str, str]:
    return ("Cookie", f"visiona_session={browser.cookies['visiona_session']}")


async def _pair(api: Api, browser: httpx.AsyncClient) -> str:
    token = await browser.post("/api/pairing/token", json={"name": "cam"}, headers=CSRF)
    async with api.browser() as agent:
        paired = await agent.post(
            "/api/pairing/exchange", json={"token": token.json()["data"]["token"]}
        )
    return str(paired.json()["data"]["device_id"])


async def test_the_feed_tells_the_owner_of_pairing_renaming_and_unpairing(api: Api) -> None:
    async with api.browser() as alice, api.browser() as bob:
        await api.login(alice, "alice")
        await api.login(bob, "bob")
        with trio.fail_after(STEP_TIMEOUT):
            async with (
                browser_websocket(_port(api), "/api/events", [_cookie(alice)]) as alice_feed,
                browser_websocket(_port(api), "/api/events", [_cookie(bob)]) as bob_feed,
            ):
                device_id = await _pair(api, alice)
                await alice.patch(f"/api/devices/{device_id}", json={"name": "porch"}, headers=CSRF)
                await alice.delete(f"/api/devices/{device_id}", headers=CSRF)
                seen = [json.loads(await alice_feed.get_message()) for _ in range(3)]
                # bob's feed got nothing of alice's: the next thing on it is his own
                bob_device = await _pair(api, bob)
                bobs = json.loads(await bob_feed.get_message())
    assert [(m["type"], m["device_id"]) for m in seen] == [
        ("device.paired", device_id),
        ("device.renamed", device_id),
        ("device.unpaired", device_id),
    ]
    assert all(m["at"].endswith("Z") for m in seen)
    assert (bobs["type"], bobs["device_id"]) == ("device.paired", bob_device)


async def test_the_feed_needs_a_session_and_an_allowed_origin(api: Api) -> None:
    async with api.browser() as alice:
        await api.login(alice, "alice")
        with trio.fail_after(STEP_TIMEOUT):
            anonymous = await websocket_handshake(_port(api), "/api/events")
            foreign = await websocket_handshake(
                _port(api), "/api/events", [_cookie(alice), ("Origin", "https://evil.test")]
            )
    assert anonymous.status == 401
    assert foreign.status == 403


async def test_a_feed_is_closed_when_its_session_ends(api: Api) -> None:
    api.server.services.feed_session_recheck = 0.05
    async with api.browser() as alice:
        await api.login(alice, "alice")
        with trio.fail_after(STEP_TIMEOUT):
            async with browser_websocket(_port(api), "/api/events", [_cookie(alice)]) as feed:
                await alice.post("/api/auth/logout", headers=CSRF)
                with pytest.raises(ConnectionClosed) as closed:
                    await feed.get_message()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1008
