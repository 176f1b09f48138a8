"""Forwarding to a device end to end: a browser logged in through the dev provider reaches
its paired device's local server through the api-server, the real remote-proxy (which
verifies the device token with the api-server) and our agent (``support.devicepath``).

Waits are on events, presence and ``InFlight.wait_idle``, each bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator

import attrs
import h11
import httpx
import pytest
import trio
from support.apiserver import CSRF, Api
from support.data import pattern_body, pattern_pieces, pattern_sha256
from support.devicepath import DevicePath, open_device_path
from support.pyrelay import MEMORY_BOUND, traced_peak
from support.system import System
from support.tunnelhttp import (
    MiB,
    hang_up_mid_download,
    http_exchange,
    http_request,
    websocket_handshake,
)
from trio_websocket import ConnectionClosed

from visiona_services.common.inflight import InFlight

#: Upper bound for one test body.
TEST_TIMEOUT = 30.0
#: The heavy transfers run on SQLite only: the database is not on their path (one session
#: check and one device lookup per request), and on PostgreSQL they would only take twice
#: the time for the same bytes.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
async def path(nursery: trio.Nursery, system: System) -> AsyncIterator[DevicePath]:
    async with open_device_path(nursery, system) as opened:
        yield opened


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]


def raw_headers(path: DevicePath, *headers: tuple[str, str]) -> list[tuple[str, str]]:
    """A raw h11 caller's headers: the session, then ``headers``."""
    return [("connection", "close"), path.cookie, *headers]


# -- HTTP -----------------------------------------------------------------------------------


async def test_a_get_reaches_the_device_at_the_same_path(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await path.browser.get("/api/cameras/hello")
    assert (response.status_code, response.text) == (200, "hello from local-1")
    [seen] = path.local.app.requests
    assert (seen.method, seen.raw_path) == ("GET", "/api/cameras/hello")


async def test_a_post_body_goes_to_the_device_and_its_answer_back(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await path.browser.post("/api/inference/echo", content=b"frame", headers=CSRF)
    assert (response.status_code, response.content) == (200, b"frame")
    assert path.local.app.requests[-1].header("content-length") == ["5"]


async def test_a_chunked_upload_reaches_the_device_chunked(path: DevicePath) -> None:
    size = 3 * MiB + 17
    with trio.fail_after(TEST_TIMEOUT):
        response = await path.browser.post(
            "/api/inference/sha256", content=pattern_body(size), headers=CSRF
        )
    assert response.text == f"{size} {pattern_sha256(size)}"
    assert path.local.app.requests[-1].header("transfer-encoding") == ["chunked"]


async def test_post_devices_scan_is_forwarded(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await path.browser.post("/api/devices/scan", headers=CSRF)
    assert response.json() == {"scanned": True}
    assert (path.local.app.requests[-1].method, path.local.app.requests[-1].raw_path) == (
        "POST",
        "/api/devices/scan",
    )


@pytest.mark.parametrize("status", [201, 204, 302, 404, 500])
async def test_the_devices_status_reaches_the_browser(path: DevicePath, status: int) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await path.browser.delete(f"/api/cameras/status/{status}", headers=CSRF)
    assert response.status_code == status
    if status == 302:
        assert response.headers["location"] == "/hello"  # the device's, as it wrote it


async def test_the_devices_response_headers_reach_the_browser(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await path.browser.get(
            "/api/cameras/headers", headers={"X-Request-ID": "trace-1"}
        )
    assert response.headers["x-custom"] == "Value"
    assert response.headers["content-type"] == "application/json"
    assert response.headers.get_list("x-request-id") == ["trace-1"]


async def test_the_devices_cookies_and_cors_headers_stay_behind(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await path.browser.get("/api/cameras/cors")
        me = await path.browser.get("/api/auth/me")
    assert response.headers["x-kept"] == "yes"
    assert "set-cookie" not in response.headers
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-credentials" not in response.headers
    assert me.status_code == 200  # the session cookie is still the api-server's


async def test_the_query_is_kept_without_device_id(path: DevicePath) -> None:
    query = f"b=2&device_id={path.device_id}&a=%20x+y&device_id={path.device_id}&c"
    with trio.fail_after(TEST_TIMEOUT):
        response = await http_request(
            path.port, "GET", f"/api/cameras/hello?{query}", headers=raw_headers(path)
        )
    assert response.status == 200
    seen = path.local.app.requests[-1]
    assert (seen.raw_path, seen.query) == ("/api/cameras/hello", "b=2&a=%20x+y&c")


async def test_the_path_reaches_the_device_escaped_as_sent(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await http_request(
            path.port, "GET", "/api/inference/a%2Fb/c%20d", headers=raw_headers(path)
        )
    assert response.status == 404  # the device has no such route
    assert path.local.app.requests[-1].raw_path == "/api/inference/a%2Fb/c%20d"


@SQLITE_ONLY
async def test_a_100_mib_download_is_byte_exact_with_bounded_memory(path: DevicePath) -> None:
    size = 100 * MiB
    digest = hashlib.sha256()
    received = 0
    async with traced_peak() as peak:
        with trio.fail_after(4 * TEST_TIMEOUT):
            async with path.browser.stream("GET", f"/api/cameras/bytes/{size}") as response:
                async for chunk in response.aiter_raw():
                    digest.update(chunk)
                    received += len(chunk)
    assert response.status_code == 200
    assert (received, digest.hexdigest()) == (size, pattern_sha256(size))
    assert peak[0] < MEMORY_BOUND, f"peak {peak[0] / MiB:.1f} MiB"


@SQLITE_ONLY
async def test_a_100_mib_upload_is_byte_exact_with_bounded_memory(path: DevicePath) -> None:
    size = 100 * MiB
    headers = {**CSRF, "Content-Length": str(size)}
    async with traced_peak() as peak:
        with trio.fail_after(4 * TEST_TIMEOUT):
            response = await path.browser.post(
                "/api/inference/sha256", content=pattern_body(size), headers=headers
            )
    assert response.text == f"{size} {pattern_sha256(size)}"
    assert peak[0] < MEMORY_BOUND, f"peak {peak[0] / MiB:.1f} MiB"


async def test_200_forwards_run_concurrently(path: DevicePath) -> None:
    # Each request's session check and device lookup take a few ms of the database: the
    # device's answers take long enough for all of them to be admitted meanwhile.
    count, delay_ms = 200, 2000
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=None)
    async with path.system.api.browser(cookies=path.browser.cookies, limits=limits) as browser:

        async def one() -> None:
            response = await browser.get(f"/api/cameras/slow?ms={delay_ms}")
            assert response.text == f"slept {delay_ms}"
            statuses.append(response.status_code)

        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(one)
    assert statuses == [200] * count
    assert path.local.app.slow_peak >= count // 2, f"at most {path.local.app.slow_peak} at once"


# -- WebSocket ------------------------------------------------------------------------------


async def test_a_websocket_echoes_text_and_bytes(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with path.websocket("/ws/echo") as ws:
            await ws.send_message("hello")
            text = await ws.get_message()
            await ws.send_message(b"\x00\xff" * 70_000)
            data = await ws.get_message()
    assert text == "hello"
    assert data == b"\x00\xff" * 70_000
    assert path.local.app.requests[-1].kind == "websocket"


async def test_a_close_code_from_the_device_reaches_the_browser(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with path.websocket("/ws/echo") as ws:
            await ws.send_message("close-4002")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    reason = closed.value.reason
    assert reason is not None
    assert (reason.code, reason.reason) == (4002, "bye")


async def test_the_browser_closing_closes_the_devices_side(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with path.websocket("/ws/echo") as ws:
            await ws.send_message("hi")
            await ws.get_message()
        await path.local.app.ws_disconnected.wait()


async def test_a_websocket_the_device_refuses_passes_its_status(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        refused = await websocket_handshake(
            path.port, "/ws/nothing", [path.cookie, ("origin", path.system.api.url)]
        )
    assert refused.status == 403  # hypercorn's answer for the device's refusal


# -- which device ---------------------------------------------------------------------------


async def test_several_devices_and_none_named_is_400_device_required(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await path.system.pair(path.browser, "second")
        response = await path.browser.get("/api/cameras/hello")
    assert_error(response, 400, "DEVICE_REQUIRED")
    assert path.local.app.requests == []


async def test_the_named_device_is_reached_by_query_or_header(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await path.system.pair(path.browser, "second")
        by_query = await path.browser.get(
            "/api/cameras/hello", params={"device_id": path.device_id}
        )
        by_header = await path.browser.get(
            "/api/cameras/hello", headers={"X-Device-ID": path.device_id}
        )
    assert by_query.status_code == by_header.status_code == 200
    assert [seen.query for seen in path.local.app.requests] == ["", ""]


async def test_an_unknown_device_is_404_device_not_found(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        by_query = await path.browser.get("/api/cameras/hello", params={"device_id": "nope"})
        by_header = await path.browser.get("/api/cameras/hello", headers={"X-Device-ID": "nope"})
        ws = await websocket_handshake(
            path.port,
            "/ws/echo?device_id=nope",
            [path.cookie, ("origin", path.system.api.url)],
        )
    assert_error(by_query, 404, "DEVICE_NOT_FOUND")
    assert_error(by_header, 404, "DEVICE_NOT_FOUND")
    assert (ws.status, json.loads(ws.body)["error"]["code"]) == (404, "DEVICE_NOT_FOUND")
    assert path.local.app.requests == []


async def test_two_different_devices_named_is_400(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await path.browser.get(
            "/api/cameras/hello",
            params={"device_id": path.device_id},
            headers={"X-Device-ID": "another"},
        )
    assert_error(response, 400, "BAD_REQUEST")


async def test_an_offline_device_is_502_tunnel_disconnected(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await path.stop_agent()
        http = await path.browser.get("/api/cameras/hello")
        ws = await websocket_handshake(
            path.port, "/ws/echo", [path.cookie, ("origin", path.system.api.url)]
        )
    assert_error(http, 502, "TUNNEL_DISCONNECTED")
    assert (ws.status, json.loads(ws.body)["error"]["code"]) == (502, "TUNNEL_DISCONNECTED")


async def test_a_slow_device_is_504_tunnel_timeout(path: DevicePath) -> None:
    proxy = path.system.proxy.state
    proxy.config = attrs.evolve(proxy.config, forward_timeout=0.3)  # read per request
    with trio.fail_after(TEST_TIMEOUT):
        response = await path.browser.get("/api/cameras/slow?ms=20000")
    assert_error(response, 504, "TUNNEL_TIMEOUT")


async def test_the_remote_proxy_down_is_502_remote_proxy_unavailable(api: Api) -> None:
    # the plain api-server of these tests: its remote-proxy URL is a port nobody serves
    with trio.fail_after(TEST_TIMEOUT):
        async with api.browser() as browser, api.browser() as agent:
            await api.login(browser, "alice")
            token = await browser.post("/api/pairing/token", json={"name": "c"}, headers=CSRF)
            await agent.post("/api/pairing/exchange", json={"token": token.json()["data"]["token"]})
            http = await browser.get("/api/cameras/hello")
            cookie = ("cookie", f"visiona_session={browser.cookies['visiona_session']}")
            port = int(api.url.rsplit(":", 1)[1])
            ws = await websocket_handshake(port, "/ws/echo", [cookie, ("origin", api.url)])
    assert_error(http, 502, "REMOTE_PROXY_UNAVAILABLE")
    assert ws.status == 502
    assert json.loads(ws.body)["error"]["code"] == "REMOTE_PROXY_UNAVAILABLE"


# -- the rules and the headers --------------------------------------------------------------


async def test_our_headers_do_not_reach_the_device(path: DevicePath) -> None:
    sent = raw_headers(
        path,
        ("x-csrf", "1"),
        ("authorization", "Bearer browser-token"),
        ("x-device-id", path.device_id),
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("x-kept", "yes"),
    )
    with trio.fail_after(TEST_TIMEOUT):
        response = await http_request(path.port, "GET", "/api/cameras/hello", headers=sent)
    assert response.status == 200
    seen = path.local.app.requests[-1]
    names = {name for name, _ in seen.headers}
    assert not names & {"cookie", "x-csrf", "authorization", "x-device-id", "x-hop", "keep-alive"}
    assert seen.header("host") == ["localhost"]  # not the api-server's
    assert seen.header("x-kept") == ["yes"]


async def test_our_request_id_reaches_the_device(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        chosen = await path.browser.get("/api/cameras/hello", headers={"X-Request-ID": "trace-7"})
        made = await path.browser.get("/api/cameras/hello")
    first, second = path.local.app.requests
    assert first.header("x-request-id") == ["trace-7"]
    assert chosen.headers["x-request-id"] == "trace-7"
    assert second.header("x-request-id") == [made.headers["x-request-id"]]


async def test_an_unsafe_forward_needs_the_csrf_header(path: DevicePath) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await path.browser.post("/api/inference/echo", content=b"x")
    assert_error(response, 403, "CSRF_REJECTED")
    assert path.local.app.requests == []


async def test_a_refused_upload_gets_its_answer_then_the_connection_closes(
    path: DevicePath,
) -> None:
    # Refused before its body was read (no X-CSRF): the answer still goes out, far more
    # body than hypercorn's queue and the sockets hold notwithstanding, and then the
    # connection closes (it cannot carry another request).
    size = 64 * MiB
    head = [*raw_headers(path), ("content-length", str(size))]
    with trio.fail_after(TEST_TIMEOUT):
        async with http_exchange(path.port) as exchange, trio.open_nursery() as nursery:

            async def send_until_closed() -> None:
                await exchange.send_request("POST", "/api/inference/echo", headers=head, end=False)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    for piece in pattern_pieces(size):
                        await exchange.send_body_piece(piece)

            nursery.start_soon(send_until_closed)
            response = await exchange.receive_whole_response()
            assert isinstance(await exchange.next_event(), h11.ConnectionClosed)
    assert response.status == 403
    assert path.local.app.requests == []


async def test_only_the_forwarded_prefixes_reach_the_device(path: DevicePath) -> None:
    targets = [
        "/api/camerasX/hello",
        "/api/devices/scanner",
        "/api/cameras/../../internal/sessions",
        "/api/cameras/%2e%2e/%2E%2E/api/auth/me",
        "/api/inference/..%2F..%2Finternal/sessions",
        "/ws/./echo",
        "http://evil.test/api/cameras/hello",
    ]
    with trio.fail_after(TEST_TIMEOUT):
        for target in targets:
            response = await http_request(path.port, "GET", target, headers=raw_headers(path))
            assert response.status == 404, (target, response.body)
    assert path.local.app.requests == []


async def test_a_browser_leaving_mid_download_leaves_no_task_behind(path: DevicePath) -> None:
    services = path.system.api.server.services
    with trio.fail_after(TEST_TIMEOUT):
        status = await hang_up_mid_download(
            path.port, f"/api/cameras/bytes/{1024 * MiB}", headers=raw_headers(path)
        )
        assert status == 200
        # The api-server resets its connection to the remote-proxy, which resets the
        # tunnel stream: the local server sees the disconnect.
        await path.local.app.download_aborted.wait()
        await _idle(services.forwards, path.system.proxy.state.inflight)
        assert _forward_tasks() == []
        response = await path.browser.get("/api/cameras/hello")
    assert response.status_code == 200


async def _idle(*counters: InFlight) -> None:
    for counter in counters:
        await counter.wait_idle()


def _forward_tasks() -> list[str]:
    """The tasks of forwards still running in this process (the api-server's, the
    remote-proxy's and the tunnel's uploads)."""
    found: list[str] = []
    modules = (
        "visiona_services.common.http_forward",
        "visiona_services.common.ws_forward",
        "visiona_services.api_server.forwarding",
        "visiona_tunnel.httpstream",
    )

    def walk(task: trio.lowlevel.Task) -> None:
        if task.name.startswith(modules):
            found.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root)
    return found
