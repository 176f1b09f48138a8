"""Pairing: one-time tokens, the agent's exchange, and the device token check the
remote-proxy makes."""

from __future__ import annotations

import re

import httpx
import trio
from support.apiserver import CSRF, INTERNAL_SECRET, Api

BEARER = {"Authorization": f"Bearer {INTERNAL_SECRET}"}


async def _token(api: Api, browser: httpx.AsyncClient, name: str = "kitchen camera") -> str:
    response = await browser.post("/api/pairing/token", json={"name": name}, headers=CSRF)
    assert response.status_code == 201, response.text
    return str(response.json()["data"]["token"])


async def test_a_pairing_token_is_shown_once_and_listed_without_it(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        created = await browser.post(
            "/api/pairing/token", json={"name": " kitchen camera "}, headers=CSRF
        )
        listed = await browser.get("/api/pairing/tokens")
    data = created.json()["data"]
    assert created.status_code == 201
    assert re.fullmatch(r"vAc_[0-9a-f]{32}", data["token"])
    assert data["name"] == "kitchen camera"
    [token] = listed.json()["data"]
    assert token["id"] == data["id"] and token["status"] == "pending"
    assert "token" not in token and data["token"] not in listed.text


async def test_the_exchange_gives_a_device_its_token_and_the_relay(api: Api) -> None:
    async with api.browser() as browser, api.browser() as agent:
        await api.login(browser, "alice")
        token = await _token(api, browser)
        exchanged = await agent.post("/api/pairing/exchange", json={"token": token})
        listed = (await browser.get("/api/pairing/tokens")).json()["data"]
        devices = (await browser.get("/api/devices")).json()["data"]
    data = exchanged.json()["data"]
    assert exchanged.status_code == 200
    assert data["relay_url"] == api.config.tunnel_public_url
    assert data["device_token"].startswith("vAd_")
    assert [(d["id"], d["name"], d["online"]) for d in devices] == [
        (data["device_id"], "kitchen camera", False)
    ]
    assert listed[0]["status"] == "used" and listed[0]["device_id"] == data["device_id"]


async def test_used_expired_revoked_and_unknown_tokens_get_one_answer(api: Api) -> None:
    async with api.browser() as browser, api.browser() as agent:
        await api.login(browser, "alice")
        used = await _token(api, browser)
        await agent.post("/api/pairing/exchange", json={"token": used})
        revoked = await _token(api, browser)
        [pending] = [
            t
            for t in (await browser.get("/api/pairing/tokens")).json()["data"]
            if t["status"] == "pending"
        ]
        assert (await browser.delete(f"/api/pairing/tokens/{pending['id']}", headers=CSRF)).json()[
            "data"
        ]["status"] == "revoked"
        expired = await _token(api, browser)
        api.clock.advance(api.config.pairing_token_ttl + 1)
        answers = [
            await agent.post("/api/pairing/exchange", json={"token": token})
            for token in (used, revoked, expired, "vAc_" + "0" * 32, "garbage")
        ]
    assert {(a.status_code, a.json()["error"]["code"]) for a in answers} == {
        (401, "PAIRING_TOKEN_INVALID")
    }


async def test_two_concurrent_exchanges_of_one_token_make_one_device(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        token = await _token(api, browser)
        statuses: list[int] = []

        async def exchange() -> None:
            async with api.browser() as agent:
                response = await agent.post("/api/pairing/exchange", json={"token": token})
                statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(exchange)
        devices = (await browser.get("/api/devices")).json()["data"]
    assert sorted(statuses) == [200] + [401] * 7
    assert len(devices) == 1


async def test_the_exchange_needs_no_session_or_csrf_but_a_json_token(api: Api) -> None:
    async with api.browser() as agent:
        for body in ({}, {"token": 5}, {"token": "x", "extra": 1}):
            response = await agent.post("/api/pairing/exchange", json=body)
            assert response.status_code == 400, body
            assert response.json()["error"]["code"] == "INVALID_REQUEST"
        not_json = await agent.post("/api/pairing/exchange", content=b"{nope")
    assert not_json.status_code == 400


async def test_the_exchange_is_rate_limited_per_address(api: Api) -> None:
    limit = int(api.config.rate_limit_pairing.split("/")[0])
    async with api.browser() as agent:
        answers = [
            (await agent.post("/api/pairing/exchange", json={"token": "garbage"})).status_code
            for _ in range(limit + 1)
        ]
    assert answers[:limit] == [401] * limit
    assert answers[limit] == 429


async def test_the_remote_proxy_verifies_device_tokens(api: Api) -> None:
    async with api.browser() as browser, api.browser() as proxy:
        await api.login(browser, "alice")
        token = await _token(api, browser)
        paired = (await proxy.post("/api/pairing/exchange", json={"token": token})).json()["data"]
        good = await proxy.post(
            "/internal/devices/verify", json={"token": paired["device_token"]}, headers=BEARER
        )
        bad = await proxy.post("/internal/devices/verify", json={"token": "vAd_x"}, headers=BEARER)
        no_secret = await proxy.post(
            "/internal/devices/verify", json={"token": paired["device_token"]}
        )
        await browser.delete(f"/api/devices/{paired['device_id']}", headers=CSRF)
        unpaired = await proxy.post(
            "/internal/devices/verify", json={"token": paired["device_token"]}, headers=BEARER
        )
    assert good.status_code == 200
    assert good.json()["data"] == {"device_id": paired["device_id"]}
    assert bad.status_code == no_secret.status_code == unpaired.status_code == 401


async def test_pairing_status_says_whether_any_device_is_online(api: Api) -> None:
    async with api.browser() as browser, api.browser() as agent:
        await api.login(browser, "alice")
        token = await _token(api, browser)
        paired = (await agent.post("/api/pairing/exchange", json={"token": token})).json()["data"]
        status = (await browser.get("/api/pairing/status")).json()["data"]
    assert status == {
        "connected": False,
        "devices": [{"id": paired["device_id"], "name": "kitchen camera", "online": False}],
    }


async def test_pairing_steps_are_audited(api: Api) -> None:
    async with api.browser() as browser, api.browser() as agent:
        await api.login(browser, "alice")
        token = await _token(api, browser)
        await agent.post("/api/pairing/exchange", json={"token": token})
        events = (await browser.get("/api/audit")).json()["data"]["events"]
    assert [e["action"] for e in events] == ["device:pair", "pairing_token:create", "auth:login"]
