"""Devices and clusters: rename, unpair, groups; validation of what comes in."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from support.apiserver import CSRF, Api

from visiona_services.api_server.db import Device
from visiona_services.api_server.devices import last_seen
from visiona_services.api_server.presence import LiveSession


async def _pair(api: Api, browser: httpx.AsyncClient, name: str) -> dict[str, str]:
    token = await browser.post("/api/pairing/token", json={"name": name}, headers=CSRF)
    async with api.browser() as agent:
        paired = await agent.post(
            "/api/pairing/exchange", json={"token": token.json()["data"]["token"]}
        )
    data: dict[str, str] = paired.json()["data"]
    return data


async def test_a_device_is_renamed_and_the_rename_audited(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        device = await _pair(api, browser, "cam")
        renamed = await browser.patch(
            f"/api/devices/{device['device_id']}", json={"name": "porch"}, headers=CSRF
        )
        events = (await browser.get("/api/audit")).json()["data"]["events"]
    assert renamed.json()["data"]["name"] == "porch"
    assert events[0]["action"] == "device:rename"
    assert events[0]["detail"] == {"from": "cam", "to": "porch"}


async def test_bad_names_are_refused(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        for name in ("", "   ", "x" * 256, "bell\x07"):
            response = await browser.post("/api/pairing/token", json={"name": name}, headers=CSRF)
            assert response.status_code == 400, name
            assert response.json()["error"]["code"] == "INVALID_REQUEST"


async def test_unpairing_deletes_the_device_and_its_memberships(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        device = await _pair(api, browser, "cam")
        other = await _pair(api, browser, "cam 2")
        cluster = await browser.post(
            "/api/clusters",
            json={"name": "all", "device_ids": [device["device_id"], other["device_id"]]},
            headers=CSRF,
        )
        gone = await browser.delete(f"/api/devices/{device['device_id']}", headers=CSRF)
        again = await browser.get(f"/api/devices/{device['device_id']}")
        members = await browser.get(f"/api/clusters/{cluster.json()['data']['id']}")
    assert gone.json()["data"] == {"id": device["device_id"], "unpaired": True}
    assert again.status_code == 404
    assert members.json()["data"]["device_ids"] == [other["device_id"]]


async def test_clusters_are_created_changed_and_deleted(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        device = await _pair(api, browser, "cam")
        created = await browser.post("/api/clusters", json={"name": "empty"}, headers=CSRF)
        cluster_id = created.json()["data"]["id"]
        changed = await browser.patch(
            f"/api/clusters/{cluster_id}",
            json={"name": "porch", "device_ids": [device["device_id"]]},
            headers=CSRF,
        )
        deleted = await browser.delete(f"/api/clusters/{cluster_id}", headers=CSRF)
        listed = await browser.get("/api/clusters")
    assert created.status_code == 201 and created.json()["data"]["device_ids"] == []
    assert changed.json()["data"]["name"] == "porch"
    assert changed.json()["data"]["device_ids"] == [device["device_id"]]
    assert deleted.json()["data"]["deleted"] is True
    assert listed.json()["data"] == []


def test_an_online_device_was_seen_at_least_when_its_tunnel_came_up() -> None:
    # Presence follows the tunnel events at once, the stored time a moment later: an answer
    # in between must not say "online, never seen".
    created = datetime(2026, 1, 1, tzinfo=UTC)
    device = Device(id="d", user_id="u", name="camera", created_at=created, last_seen_at=None)
    live = LiveSession("d", "2026-01-02T03:04:05.678Z", "127.0.0.1:1", None)
    assert last_seen(device, live) == datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert last_seen(device, None) is None
    device.last_seen_at = datetime(2026, 1, 3, tzinfo=UTC)  # stored after the tunnel came up
    assert last_seen(device, live) == device.last_seen_at
