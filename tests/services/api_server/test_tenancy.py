"""Strict tenancy: another user's tokens, devices and clusters answer exactly as if they
did not exist, on every route that names one (walked over the route table), and never
show up in a listing."""

from __future__ import annotations

import json
import re

import httpx
import trio
from support.apiserver import CSRF, STEP_TIMEOUT, Api
from support.tunnelhttp import websocket_handshake

from visiona_services.api_server import create_app
from visiona_services.api_server.forwarding import forward_routes

#: A body each unsafe route accepts when the thing is the caller's own.
BODIES = {"PATCH": {"name": "renamed"}, "POST": {"name": "x"}, "PUT": {"name": "x"}}


async def _alice_things(api: Api, alice: httpx.AsyncClient) -> dict[str, str]:
    token = await alice.post("/api/pairing/token", json={"name": "cam"}, headers=CSRF)
    second = await alice.post("/api/pairing/token", json={"name": "cam 2"}, headers=CSRF)
    async with api.browser() as agent:
        paired = await agent.post(
            "/api/pairing/exchange", json={"token": token.json()["data"]["token"]}
        )
    device_id = paired.json()["data"]["device_id"]
    cluster = await alice.post(
        "/api/clusters", json={"name": "kitchen", "device_ids": [device_id]}, headers=CSRF
    )
    model = await alice.post(
        "/api/models/init",
        json={"name": "yolo", "filename": "yolo.onnx", "size": 10},
        headers=CSRF,
    )
    return {
        "token_id": second.json()["data"]["id"],
        "device_id": device_id,
        "cluster_id": cluster.json()["data"]["id"],
        "model_id": model.json()["data"]["model_id"],
    }


async def test_every_route_naming_another_users_thing_answers_not_found(api: Api) -> None:
    async with api.browser() as alice, api.browser() as bob:
        await api.login(alice, "alice")
        await api.login(bob, "bob")
        things = await _alice_things(api, alice)
        app = create_app(api.server.services)
        walked = 0
        for rule in app.url_map.iter_rules():
            names = re.findall(r"<(?:[^:>]+:)?([^>]+)>", rule.rule)
            if not names or rule.websocket or rule.rule.startswith("/internal/"):
                continue
            assert set(names) <= set(things), f"{rule.rule}: add its ids to this test"
            path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: things[m.group(1)], rule.rule)
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                response = await bob.request(method, path, json=BODIES.get(method), headers=CSRF)
                assert response.status_code == 404, (method, path, response.text)
                assert response.json()["error"]["code"].endswith("_NOT_FOUND")
                walked += 1
        # alice's things are untouched and still hers
        device = await alice.get(f"/api/devices/{things['device_id']}")
        cluster = await alice.get(f"/api/clusters/{things['cluster_id']}")
        model = await alice.get(f"/api/models/{things['model_id']}")
    assert walked >= 10
    assert model.json()["data"]["status"] == "pending"
    assert device.json()["data"]["name"] == "cam"
    assert cluster.json()["data"]["device_ids"] == [things["device_id"]]


async def test_every_forwarded_route_naming_another_users_device_answers_not_found(
    api: Api,
) -> None:
    port = int(api.url.rsplit(":", 1)[1])
    answers: list[tuple[str, str, int, str]] = []
    async with api.browser() as alice, api.browser() as bob:
        await api.login(alice, "alice")
        await api.login(bob, "bob")
        device_id = (await _alice_things(api, alice))["device_id"]
        handshake = [("Cookie", f"visiona_session={bob.cookies['visiona_session']}")]
        handshake.append(("Origin", api.url))
        namings = [(f"?device_id={device_id}", {}), ("", {"X-Device-ID": device_id})]
        with trio.fail_after(STEP_TIMEOUT):
            for route in forward_routes(api.config):
                path = re.sub(r"<[^>]+>", "x", route.rule)
                for query, named in namings:
                    if route.kind == "websocket":
                        headers = [*handshake, *named.items()]
                        refused = await websocket_handshake(port, path + query, headers)
                        code = json.loads(refused.body)["error"]["code"]
                        answers.append(("WEBSOCKET", path + query, refused.status, code))
                        continue
                    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                        response = await bob.request(
                            method, path + query, headers={**CSRF, **named}
                        )
                        code = response.json()["error"]["code"]
                        answers.append((method, path + query, response.status_code, code))
    assert len(answers) >= 8 * 6
    assert [a for a in answers if a[2:] != (404, "DEVICE_NOT_FOUND")] == []


async def test_listings_show_only_the_callers_own(api: Api) -> None:
    async with api.browser() as alice, api.browser() as bob:
        await api.login(alice, "alice")
        await api.login(bob, "bob")
        await _alice_things(api, alice)
        for path in ("/api/devices", "/api/pairing/tokens", "/api/clusters"):
            assert (await bob.get(path)).json()["data"] == [], path
        assert (await bob.get("/api/models")).json()["data"]["models"] == []
        status = (await bob.get("/api/pairing/status")).json()["data"]
    assert status == {"connected": False, "devices": []}


async def test_a_cluster_cannot_take_another_users_device(api: Api) -> None:
    async with api.browser() as alice, api.browser() as bob:
        await api.login(alice, "alice")
        await api.login(bob, "bob")
        things = await _alice_things(api, alice)
        created = await bob.post(
            "/api/clusters",
            json={"name": "mine", "device_ids": [things["device_id"]]},
            headers=CSRF,
        )
        clusters = (await bob.get("/api/clusters")).json()["data"]
    assert created.status_code == 404
    assert created.json()["error"]["code"] == "DEVICE_NOT_FOUND"
    assert clusters == []
