"""The rules every route follows (default deny, CSRF, CORS, the envelope, request ids,
rate limits), checked over the app's whole route table where they apply to every route."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import quart
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from sqlalchemy import select
from support.apiserver import CSRF, INTERNAL_SECRET, STEP_TIMEOUT, Api, running_api
from support.tunnelhttp import browser_websocket, http_exchange, websocket_handshake

from visiona_services.api_server import create_app
from visiona_services.api_server.db import AuditEvent
from visiona_services.api_server.forwarding import forward_routes
from visiona_services.api_server.policy import (
    UNSAFE_METHODS,
    Access,
    access_of,
    internal,
    public,
)
from visiona_services.api_server.storage_routes import STORAGE_METHODS, STORAGE_RULE

from .conftest import start_stack

#: The routes anyone may call; adding one to the app means adding it here, on purpose.
PUBLIC_ROUTES = {
    "/healthz",
    "/api/auth/login",
    "/api/auth/callback",
    "/api/auth/backchannel-logout",
    "/api/pairing/exchange",
    "/storage/x",  # the signed URL is the authority (test_models)
}


#: The methods the walks try on a forwarded path (it takes any).
FORWARD_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def _concrete(rule: str) -> str:
    """A path matching ``rule`` (every variable part becomes ``x``)."""
    return re.sub(r"<[^>]+>", "x", rule)


def _rules(api: Api) -> list[tuple[str, str, Access, bool]]:
    """(path, method, access, websocket) for every route of the app: Quart's, and the
    paths forwarded to devices (any method)."""
    app = create_app(api.server.services)
    found = []
    for rule in app.url_map.iter_rules():
        access = access_of(app.view_functions[rule.endpoint])
        methods = sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}) or ["GET"]
        for method in methods:
            found.append((_concrete(rule.rule), method, access, bool(rule.websocket)))
    for method in STORAGE_METHODS:
        found.append((_concrete(STORAGE_RULE), method, Access.PUBLIC, False))
    for route in forward_routes(api.config):
        websocket = route.kind == "websocket"
        for method in ["GET"] if websocket else FORWARD_METHODS:
            found.append((_concrete(route.rule), method, Access.SESSION, websocket))
    return found


def _port(api: Api) -> int:
    return int(api.url.rsplit(":", 1)[1])


async def test_only_the_listed_routes_are_public(api: Api) -> None:
    public_routes = {path for path, _, access, _ in _rules(api) if access is Access.PUBLIC}
    assert public_routes == PUBLIC_ROUTES


async def test_every_other_route_answers_401_without_a_session(api: Api) -> None:
    walked = 0
    async with api.browser() as browser:
        for path, method, access, websocket in _rules(api):
            if access is Access.PUBLIC or websocket:
                continue
            response = await browser.request(method, path, headers=CSRF)
            assert response.status_code == 401, (method, path)
            assert response.json()["error"]["code"] == "UNAUTHORIZED"
            walked += 1
    assert walked >= 4


async def test_every_websocket_route_answers_401_without_a_session(api: Api) -> None:
    paths = [path for path, _, _, websocket in _rules(api) if websocket]
    with trio.fail_after(STEP_TIMEOUT):
        for path in paths:
            refused = await websocket_handshake(_port(api), path, [("Origin", api.url)])
            assert refused.status == 401, path
            assert json.loads(refused.body)["error"]["code"] == "UNAUTHORIZED"
    assert "/api/events" in paths and "/ws/x" in paths


async def test_every_unsafe_session_route_needs_the_csrf_header(api: Api) -> None:
    walked = []
    async with api.browser() as browser:
        await api.login(browser, "alice")
        for path, method, access, websocket in _rules(api):
            if access is not Access.SESSION or websocket or method not in UNSAFE_METHODS:
                continue
            response = await browser.request(method, path)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["error"]["code"] == "CSRF_REJECTED"
            walked.append((method, path))
        assert (await browser.get("/api/auth/me")).status_code == 200  # nothing happened
    assert ("POST", "/api/devices/scan") in walked and ("DELETE", "/api/cameras/x") in walked


async def test_every_websocket_route_refuses_a_foreign_origin(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        cookie = ("Cookie", f"visiona_session={browser.cookies['visiona_session']}")
    walked = 0
    with trio.fail_after(STEP_TIMEOUT):
        for path, _, _, websocket in _rules(api):
            if not websocket:
                continue
            foreign = [cookie, ("Origin", "https://evil.test")]
            refused = await websocket_handshake(_port(api), path, foreign)
            assert refused.status == 403, path
            assert json.loads(refused.body)["error"]["code"] == "CSRF_REJECTED"
            walked += 1
    assert walked >= 2


async def test_unknown_paths_and_methods_answer_401_before_404(api: Api) -> None:
    async with api.browser() as browser:
        assert (await browser.get("/api/nothing-here")).status_code == 401
        assert (await browser.delete("/healthz")).status_code == 401
        await api.login(browser, "alice")
        missing = await browser.get("/api/nothing-here")
        wrong = await browser.delete("/api/auth/me", headers=CSRF)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "NOT_FOUND"
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


async def test_a_bad_session_cookie_is_401(api: Api) -> None:
    for cookie in ("", "garbage", "abc.def", "x" * 5000):
        async with api.browser(cookies={"visiona_session": cookie}) as browser:
            assert (await browser.get("/api/auth/me")).status_code == 401


async def test_unsafe_methods_need_the_csrf_header(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        refused = await browser.post("/api/auth/logout")
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "CSRF_REJECTED"
        assert (await browser.get("/api/auth/me")).status_code == 200  # nothing happened


async def test_two_origin_headers_are_refused(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        headers = [("X-CSRF", "1"), ("Origin", api.url), ("Origin", "https://evil.test")]
        response = await browser.post("/api/auth/logout", headers=headers)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "CSRF_REJECTED"


async def test_a_foreign_origin_is_refused_even_with_the_header(api: Api) -> None:
    async with api.browser() as browser:
        await api.login(browser, "alice")
        evil = {**CSRF, "Origin": "https://evil.test"}
        assert (await browser.post("/api/auth/logout", headers=evil)).status_code == 403
        own = {**CSRF, "Origin": api.url}
        assert (await browser.post("/api/auth/logout", headers=own)).status_code == 200


async def test_errors_are_the_envelope_with_the_request_id(api: Api) -> None:
    async with api.browser() as browser:
        response = await browser.get("/api/auth/me", headers={"X-Request-ID": "req-123"})
    assert response.headers["x-request-id"] == "req-123"
    assert response.json() == {
        "success": False,
        "error": {
            "code": "UNAUTHORIZED",
            "message": response.json()["error"]["message"],
            "request_id": "req-123",
        },
    }


async def test_a_request_id_is_made_when_none_or_a_bad_one_is_sent(api: Api) -> None:
    async with api.browser() as browser:
        plain = await browser.get("/healthz")
        bad = await browser.get("/healthz", headers={"X-Request-ID": "bad id!"})
    assert re.fullmatch(r"[0-9a-f]{32}", plain.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"])


async def test_an_oversized_body_is_413_in_the_envelope_before_it_is_read(api: Api) -> None:
    port = int(api.url.rsplit(":", 1)[1])
    declared = [
        ("connection", "close"),
        ("content-type", "application/x-www-form-urlencoded"),
        ("content-length", str(2 << 20)),
    ]
    with trio.fail_after(STEP_TIMEOUT):
        async with http_exchange(port) as exchange:
            # the head declares 2 MiB; not a byte of it is sent
            await exchange.send_request(
                "POST", "/api/auth/backchannel-logout", headers=declared, end=False
            )
            response = await exchange.receive_whole_response()
    assert response.status == 413
    assert json.loads(response.body)["error"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_health_is_public_and_cheap(api: Api) -> None:
    async with api.browser() as browser:
        response = await browser.get("/healthz")
    assert response.json() == {"success": True, "data": {"status": "ok"}}
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"


# -- CORS -----------------------------------------------------------------------------------

FRONTEND = "http://app.test:3000"


@pytest.fixture
async def cors_api(nursery: trio.Nursery, database_url: str, tmp_path: Path) -> AsyncIterator[Api]:
    stack = await start_stack(nursery, database_url, tmp_path, cors_allowed_origins=FRONTEND)
    async with running_api(stack.config, stack.sockets, stack.url, stack.provider) as api:
        yield api


async def test_a_preflight_from_an_allowed_origin_gets_the_cors_headers(cors_api: Api) -> None:
    async with cors_api.browser() as browser:
        response = await browser.options(
            "/api/auth/logout",
            headers={"Origin": FRONTEND, "Access-Control-Request-Method": "POST"},
        )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == FRONTEND
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "x-csrf" in response.headers["access-control-allow-headers"]


async def test_a_preflight_from_another_origin_is_refused(cors_api: Api) -> None:
    async with cors_api.browser() as browser:
        response = await browser.options(
            "/api/auth/logout",
            headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "POST"},
        )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "CORS_REJECTED"
    assert "access-control-allow-origin" not in response.headers


async def test_only_allowed_origins_get_cors_headers(cors_api: Api) -> None:
    async with cors_api.browser() as browser:
        allowed = await browser.get("/healthz", headers={"Origin": FRONTEND})
        other = await browser.get("/healthz", headers={"Origin": "https://evil.test"})
        none = await browser.get("/healthz")
    assert allowed.headers["access-control-allow-origin"] == FRONTEND
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in none.headers


async def test_an_allowed_origin_may_make_unsafe_calls(cors_api: Api) -> None:
    async with cors_api.browser() as browser:
        await cors_api.login(browser, "alice")
        response = await browser.post("/api/auth/logout", headers={**CSRF, "Origin": FRONTEND})
    assert response.status_code == 200


# -- rate limits ----------------------------------------------------------------------------


async def test_login_is_rate_limited_per_address(
    nursery: trio.Nursery, database_url: str, tmp_path: Path
) -> None:
    stack = await start_stack(nursery, database_url, tmp_path, rate_limit_login="3/60")
    async with running_api(stack.config, stack.sockets, stack.url, stack.provider) as api:
        async with api.browser() as browser:
            statuses = [(await browser.get("/api/auth/login")).status_code for _ in range(3)]
            limited = await browser.get("/api/auth/login")
            callback = await browser.get("/api/auth/callback")  # the same limit
        assert statuses == [302, 302, 302]
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "RATE_LIMITED"
        assert 1 <= int(limited.headers["retry-after"]) <= 20
        assert callback.status_code == 429


# -- an app with extra routes: unexpected failures and WebSocket handshakes -----------------


async def _serve_with_extra_routes(nursery: trio.Nursery, api: Api) -> str:
    app = create_app(api.server.services)

    @app.get("/api/test/boom")
    @public
    async def boom() -> quart.Response:
        raise RuntimeError("secret detail: db password hunter2")

    @app.get("/internal/test/ping")
    @internal
    async def ping() -> quart.Response:
        return quart.Response("pong")

    @app.get("/internal/test/unmarked")
    async def unmarked() -> quart.Response:
        return quart.Response("forgot its marker")

    @app.websocket("/api/test/ws")
    async def echo() -> None:
        await quart.websocket.accept()
        await quart.websocket.send(await quart.websocket.receive())

    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = config.errorlog = None
    urls: list[str] = await nursery.start(functools.partial(serve, app, config))
    return urls[0]


async def test_an_unexpected_failure_is_500_internal_without_details(
    nursery: trio.Nursery, api: Api
) -> None:
    url = await _serve_with_extra_routes(nursery, api)
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/api/test/boom")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "INTERNAL"
    assert "hunter2" not in response.text and "Traceback" not in response.text


async def test_websocket_handshakes_need_a_session_and_an_allowed_origin(
    nursery: trio.Nursery, api: Api
) -> None:
    port = int((await _serve_with_extra_routes(nursery, api)).rsplit(":", 1)[1])
    async with api.browser() as browser:
        await api.login(browser, "alice")
        cookie = ("Cookie", f"visiona_session={browser.cookies['visiona_session']}")
    with trio.fail_after(STEP_TIMEOUT):
        anonymous = await websocket_handshake(port, "/api/test/ws")
        foreign = await websocket_handshake(
            port, "/api/test/ws", [cookie, ("Origin", "https://evil.test")]
        )
        async with browser_websocket(port, "/api/test/ws", [cookie, ("Origin", api.url)]) as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
    assert anonymous.status == 401
    assert json.loads(anonymous.body)["error"]["code"] == "UNAUTHORIZED"
    assert foreign.status == 403
    assert json.loads(foreign.body)["error"]["code"] == "CSRF_REJECTED"


async def test_internal_routes_need_the_bearer_secret(nursery: trio.Nursery, api: Api) -> None:
    url = await _serve_with_extra_routes(nursery, api)
    async with httpx.AsyncClient(base_url=url) as client:
        without = await client.get("/internal/test/ping")
        wrong = await client.get("/internal/test/ping", headers={"Authorization": "Bearer no"})
        right = await client.get(
            "/internal/test/ping", headers={"Authorization": f"Bearer {INTERNAL_SECRET}"}
        )
    assert without.status_code == wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "UNAUTHORIZED"
    assert right.status_code == 200


async def test_an_internal_route_without_its_marker_still_needs_the_secret(
    nursery: trio.Nursery, api: Api
) -> None:
    url = await _serve_with_extra_routes(nursery, api)
    async with api.browser() as browser:
        await api.login(browser, "alice")
        cookie = {"visiona_session": str(browser.cookies["visiona_session"])}
    async with httpx.AsyncClient(base_url=url, cookies=cookie) as client:
        with_session = await client.get("/internal/test/unmarked")
        with_secret = await client.get(
            "/internal/test/unmarked", headers={"Authorization": f"Bearer {INTERNAL_SECRET}"}
        )
    assert with_session.status_code == 401
    assert with_secret.status_code == 200


# -- behind a reverse proxy -----------------------------------------------------------------


async def test_a_trusted_proxy_names_the_client_for_limits_and_audit(
    nursery: trio.Nursery, database_url: str, tmp_path: Path
) -> None:
    stack = await start_stack(
        nursery, database_url, tmp_path, trusted_proxies="127.0.0.1", rate_limit_login="1/60"
    )
    async with running_api(stack.config, stack.sockets, stack.url, stack.provider) as api:
        async with api.browser() as browser:
            first = await browser.get(
                "/api/auth/login", headers={"X-Forwarded-For": "198.51.100.9, 203.0.113.7"}
            )
            other = await browser.get("/api/auth/login", headers={"X-Forwarded-For": "203.0.113.8"})
            again = await browser.get("/api/auth/login", headers={"X-Forwarded-For": "203.0.113.7"})
            failed = await browser.get(
                "/api/auth/callback", headers={"X-Forwarded-For": "192.0.2.1"}
            )
        events = await api.server.services.db.run(lambda db: db.scalars(select(AuditEvent)).all())
    assert (first.status_code, other.status_code, again.status_code) == (302, 302, 429)
    assert failed.status_code == 400
    assert [event.client_address for event in events] == ["192.0.2.1"]


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(api: Api) -> None:
    async with api.browser() as browser:
        await browser.get("/api/auth/callback", headers={"X-Forwarded-For": "192.0.2.1"})
    events = await api.server.services.db.run(lambda db: db.scalars(select(AuditEvent)).all())
    assert [event.client_address for event in events] == ["127.0.0.1"]
