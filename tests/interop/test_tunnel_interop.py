"""Our tunnel ends against the Go ones (``tunnelpeers/``), both ways:

* ``test_go_agent_*``: the Go agent (``goagent``) -> our relay (``serve_tunnel_listener`` +
  ``TunnelRegistry``); the caller is ``Tunnel.request`` / ``Tunnel.open_stream``.
* ``test_py_agent_*``: our agent (``TunnelClient``) -> the Go relay (``gorelay``); the
  caller is an HTTP client on the Go relay's front (``/forward/<device>/...``,
  ``/ws/<device>/...``).

The agent's local server is ``support.tunnelhttp.LocalApp`` on hypercorn (the ``local``
fixture, in ``tests/conftest.py``). Tests wait for the Go peers' stdout lines, our agent's
hooks and our relay's registry; every wait is bounded.
"""

from __future__ import annotations

import json

import pytest
import trio
from support.data import pattern, pattern_body, pattern_sha256
from support.pyagent import PyAgent, start_py_agent
from support.pyrelay import PyRelay, fetch, fetch_digest, hang_up_mid_body, start_py_relay
from support.tunnelhttp import (
    LocalServer,
    browser_websocket,
    closed_port,
    hang_up_mid_download,
    http_download,
    http_request,
    start_local_server,
    websocket_handshake,
)
from trio_websocket import ConnectionClosed

from visiona_tunnel.client import ClientConfig, ClientState, Replaced, TokenRefused
from visiona_tunnel.relay import Tunnel
from visiona_tunnel.wsconn import CLOSE_REPLACED, client_handshake

from .tunnelpeers import (
    GoAgent,
    GoRelay,
    Retry,
    TunnelPeerBinaries,
    start_go_agent,
    start_go_relay,
)

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
TOKEN = "token-1"
DEVICE = "device-1"
#: Upper bound for one test body.
TEST_TIMEOUT = 60.0
STATUSES = (201, 204, 301, 302, 304, 400, 404, 418, 500, 503)
#: Request headers sent to ``/headers``: a repeated one, odd case, a custom User-Agent.
REQUEST_HEADERS = [("X-One", "1"), ("x-two", "a"), ("x-two", "b"), ("User-Agent", "interop")]
#: What the local server sees of them, sorted (Go sorts header names when it writes).
EXPECTED_SEEN = [("user-agent", "interop"), ("x-one", "1"), ("x-two", "a"), ("x-two", "b")]


def local_saw(body: bytes) -> list[tuple[str, str]]:
    """The ``x-*`` and ``user-agent`` request headers the local server's ``/headers`` saw."""
    pairs = [(str(name), str(value)) for name, value in json.loads(body)]
    return [(name, value) for name, value in pairs if name.startswith("x-") or name == "user-agent"]


# == the Go agent -> our relay ==================================================================


@pytest.fixture
async def py_relay(nursery: trio.Nursery) -> PyRelay:
    return await start_py_relay(nursery, {TOKEN: DEVICE})


@pytest.fixture
async def go_agent(
    nursery: trio.Nursery, tunnel_peers: TunnelPeerBinaries, py_relay: PyRelay, local: LocalServer
) -> GoAgent:
    agent = await start_go_agent(
        nursery, tunnel_peers, relay_url=py_relay.url, token=TOKEN, local=local.address
    )
    await agent.expect_online()
    return agent


@pytest.fixture
async def go_tunnel(py_relay: PyRelay, go_agent: GoAgent) -> Tunnel:
    """Our relay's tunnel to the Go agent."""
    with trio.fail_after(10):
        return await py_relay.registry.wait_for(DEVICE)


async def test_go_agent_get_with_query(go_tunnel: Tunnel) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch(go_tunnel, "GET", "/hello?x=1&y=%2F")
    assert (response.status, response.body) == (200, b"hello from local-1")
    assert response.header(b"x-query") == b"x=1&y=%2F"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_go_agent_post_echo(go_tunnel: Tunnel, framing: str) -> None:
    body = pattern(0, MiB) if framing == "content-length" else pattern_body(MiB)
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch(go_tunnel, "POST", "/echo", body=body)
    assert response.status == 200
    assert response.body == pattern(0, MiB)


async def test_go_agent_download_100_mib_sha256(go_tunnel: Tunnel) -> None:
    size = 100 * MiB
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch_digest(go_tunnel, "GET", f"/bytes/{size}")
    assert response.status == 200
    assert (response.size, response.sha256) == (size, pattern_sha256(size))


async def test_go_agent_upload_50_mib_sha256(go_tunnel: Tunnel) -> None:
    size = 50 * MiB
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch(go_tunnel, "POST", "/sha256", body=pattern_body(size))
    assert (response.status, response.body) == (200, f"{size} {pattern_sha256(size)}".encode())


async def test_go_agent_200_slow_requests_run_concurrently(
    go_tunnel: Tunnel, local: LocalServer
) -> None:
    count, delay_ms = 200, 500
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await fetch(go_tunnel, "GET", f"/slow?ms={delay_ms}")).status)

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    assert statuses == [200] * count
    assert local.app.slow_peak >= count // 2, f"at most {local.app.slow_peak} at once"


async def test_go_agent_status_codes_pass_through(go_tunnel: Tunnel) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        for status in STATUSES:
            response = await fetch(go_tunnel, "GET", f"/status/{status}")
            assert response.status == status
            expected = b"" if status in (204, 304) else f"status {status}".encode()
            assert response.body == expected
            if 300 <= status < 400:
                assert response.header(b"location") == b"/hello"  # not followed


async def test_go_agent_headers_pass_through(go_tunnel: Tunnel) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch(go_tunnel, "GET", "/headers", REQUEST_HEADERS)
    assert response.status == 200
    saw = local_saw(response.body)
    assert sorted(saw) == [
        ("user-agent", "interop"),
        ("x-one", "1"),
        ("x-two", "a"),
        ("x-two", "b"),
    ]
    assert response.header(b"x-custom") == b"Value"
    cookies = [value for name, value in response.headers if name.lower() == b"set-cookie"]
    assert cookies == [b"a=1", b"b=2"]


@pytest.mark.parametrize("query", ["", "?cl=1"], ids=["chunked", "content-length"])
async def test_go_agent_response_keeps_its_framing(go_tunnel: Tunnel, query: str) -> None:
    size = 5 * MiB + 123
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch_digest(go_tunnel, "GET", f"/bytes/{size}{query}")
    headers = {name.lower(): value for name, value in response.headers}
    if query:
        assert headers[b"content-length"] == str(size).encode()
    else:
        assert headers[b"transfer-encoding"] == b"chunked"
    assert (response.size, response.sha256) == (size, pattern_sha256(size))


async def test_go_agent_websocket_echo_over_a_raw_stream(
    go_tunnel: Tunnel, local: LocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        ws = await client_handshake(await go_tunnel.open_stream(), local.address, "/ws/echo")
        await ws.send_all(b"hello")
        assert await ws.receive_some() == b"hello"
        data = pattern(5, 3 * MiB)
        await ws.send_all(data)
        echoed = bytearray()
        while len(echoed) < len(data):
            chunk = await ws.receive_some()
            assert chunk, "EOF before the whole echo"
            echoed += chunk
        assert echoed == data
        await ws.aclose()
        await local.app.ws_disconnected.wait()


async def test_go_agent_stops_when_our_relay_gives_up_mid_download(
    go_tunnel: Tunnel, local: LocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await hang_up_mid_body(go_tunnel, f"/bytes/{1024 * MiB}")
        await local.app.download_aborted.wait()
        assert (await fetch(go_tunnel, "GET", "/hello")).status == 200


async def test_go_agent_replaced_gets_4001_and_backs_off(
    nursery: trio.Nursery, tunnel_peers: TunnelPeerBinaries, py_relay: PyRelay, local: LocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        older = await start_go_agent(
            nursery,
            tunnel_peers,
            relay_url=py_relay.url,
            token=TOKEN,
            local=local.address,
            extra_args=["-backoff-base", "1m", "-backoff-cap", "1m"],
        )
        await older.expect_online()
        first = await py_relay.registry.wait_for(DEVICE)

        local2 = await start_local_server(nursery, "local-2")
        newer = await start_go_agent(
            nursery, tunnel_peers, relay_url=py_relay.url, token=TOKEN, local=local2.address
        )
        await newer.expect_online()
        reason = await older.expect_offline()
        assert reason.startswith(f"websocket: close {CLOSE_REPLACED}"), reason
        assert await older.expect_retry() == Retry(1, "1m0s", "replaced")
        assert first.replaced

        tunnel = await py_relay.registry.wait_for(DEVICE)
        response = await fetch(tunnel, "GET", "/hello")
        assert response.body == b"hello from local-2"
        assert await older.terminate() == 0


async def test_go_agent_with_a_bad_token_gets_401_and_backs_off_by_the_cap(
    nursery: trio.Nursery, tunnel_peers: TunnelPeerBinaries, py_relay: PyRelay
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_go_agent(
            nursery, tunnel_peers, relay_url=py_relay.url, token="wrong", local="127.0.0.1:9"
        )
        assert await agent.expect_retry() == Retry(1, "30s", "unauthorized")
        assert len(py_relay.registry) == 0
        assert await agent.terminate() == 0


async def test_go_agent_with_its_local_server_down_answers_502(
    nursery: trio.Nursery, tunnel_peers: TunnelPeerBinaries, py_relay: PyRelay
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_go_agent(
            nursery,
            tunnel_peers,
            relay_url=py_relay.url,
            token=TOKEN,
            local=f"127.0.0.1:{closed_port()}",
        )
        await agent.expect_online()
        tunnel = await py_relay.registry.wait_for(DEVICE)
        response = await fetch(tunnel, "GET", "/hello")
    assert response.status == 502
    assert response.body.startswith(b"local server unreachable")


# == our agent -> the Go relay ==================================================================


@pytest.fixture
async def go_relay(nursery: trio.Nursery, tunnel_peers: TunnelPeerBinaries) -> GoRelay:
    return await start_go_relay(nursery, tunnel_peers, {TOKEN: DEVICE})


@pytest.fixture
async def py_agent(nursery: trio.Nursery, go_relay: GoRelay, local: LocalServer) -> PyAgent:
    """Our agent for DEVICE, online at the Go relay."""
    agent = await start_py_agent(nursery, go_relay.tunnel_url, TOKEN, local.port)
    await agent.hooks.wait_for("session_up")
    await go_relay.expect_connected(DEVICE)
    return agent


def via(path: str, device: str = DEVICE) -> str:
    """The Go relay's front route to ``path`` on ``device``'s local server."""
    return f"/forward/{device}{path}"


async def test_py_agent_get_with_query(go_relay: GoRelay, py_agent: PyAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await http_request(go_relay.http_port, "GET", via("/hello?x=1&y=%2F"))
    assert (response.status, response.body) == (200, b"hello from local-1")
    assert response.headers["x-query"] == "x=1&y=%2F"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_py_agent_post_echo(go_relay: GoRelay, py_agent: PyAgent, chunked: bool) -> None:
    data = pattern(3, MiB)
    with trio.fail_after(TEST_TIMEOUT):
        response = await http_request(
            go_relay.http_port, "POST", via("/echo"), data, chunked=chunked
        )
    assert (response.status, response.body) == (200, data)


async def test_py_agent_download_100_mib_sha256(go_relay: GoRelay, py_agent: PyAgent) -> None:
    size = 100 * MiB
    response = await http_download(go_relay.http_port, via(f"/bytes/{size}"), timeout=TEST_TIMEOUT)
    assert response.status == 200
    assert (response.size, response.sha256) == (size, pattern_sha256(size))


async def test_py_agent_upload_50_mib_sha256(go_relay: GoRelay, py_agent: PyAgent) -> None:
    size = 50 * MiB
    with trio.fail_after(TEST_TIMEOUT):
        response = await http_request(go_relay.http_port, "POST", via("/sha256"), pattern(0, size))
    assert (response.status, response.body) == (200, f"{size} {pattern_sha256(size)}".encode())


@pytest.mark.parametrize("query", ["", "?cl=1"], ids=["chunked", "content-length"])
async def test_py_agent_response_keeps_its_framing(
    go_relay: GoRelay, py_agent: PyAgent, query: str
) -> None:
    size = 5 * MiB + 123
    response = await http_download(go_relay.http_port, via(f"/bytes/{size}{query}"))
    assert response.status == 200
    if query:
        assert response.headers["content-length"] == str(size)
    else:
        assert response.headers["transfer-encoding"] == "chunked"
    assert (response.size, response.sha256) == (size, pattern_sha256(size))


async def test_py_agent_status_codes_pass_through(go_relay: GoRelay, py_agent: PyAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        for status in STATUSES:
            response = await http_request(go_relay.http_port, "GET", via(f"/status/{status}"))
            assert response.status == status
            expected = b"" if status in (204, 304) else f"status {status}".encode()
            assert response.body == expected
            if 300 <= status < 400:
                assert response.headers["location"] == "/hello"


async def test_py_agent_headers_pass_through(go_relay: GoRelay, py_agent: PyAgent) -> None:
    headers = [("connection", "close"), *REQUEST_HEADERS]
    with trio.fail_after(TEST_TIMEOUT):
        response = await http_request(go_relay.http_port, "GET", via("/headers"), headers=headers)
    assert response.status == 200
    saw = local_saw(response.body)
    assert sorted(saw) == [
        ("user-agent", "interop"),
        ("x-one", "1"),
        ("x-two", "a"),
        ("x-two", "b"),
    ]
    assert response.headers["x-custom"] == "Value"
    cookies = [value for name, value in response.header_list if name == "set-cookie"]
    assert cookies == ["a=1", "b=2"]


async def test_py_agent_websocket_echo_through_the_go_relay(
    go_relay: GoRelay, py_agent: PyAgent, local: LocalServer
) -> None:
    resource = f"/ws/{DEVICE}/ws/echo"
    with trio.fail_after(TEST_TIMEOUT):
        async with browser_websocket(go_relay.http_port, resource) as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            data = pattern(5, 3 * MiB)
            await ws.send_message(data)
            assert await ws.get_message() == data
            await ws.send_message("close-4002")  # the local server closes: 4002 "bye"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            reason = closed.value.reason
            assert reason is not None
            assert (reason.code, reason.reason) == (4002, "bye")

        async with browser_websocket(go_relay.http_port, resource) as ws:
            await ws.send_message(b"\x00\x01")
            assert await ws.get_message() == b"\x00\x01"
            await ws.aclose(code=4005, reason="browser leaves")
        await local.app.ws_disconnected.wait()


async def test_py_agent_passes_on_a_refused_websocket_upgrade(
    go_relay: GoRelay, py_agent: PyAgent
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await websocket_handshake(go_relay.http_port, f"/ws/{DEVICE}/ws/nowhere")
    assert (response.status, response.body) == (403, b"UPSTREAM_REFUSED")  # hypercorn's 403


async def test_py_agent_comes_back_after_the_go_relay_restarts(
    nursery: trio.Nursery, tunnel_peers: TunnelPeerBinaries, go_relay: GoRelay, py_agent: PyAgent
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert await go_relay.peer.terminate() == 0
        _, error = await py_agent.hooks.wait_for("session_down")
        assert not isinstance(error, Replaced)
        await py_agent.hooks.wait_for("dial_failed")  # nobody listens now
        relay2 = await start_go_relay(
            nursery, tunnel_peers, {TOKEN: DEVICE}, tunnel_port=go_relay.tunnel_port
        )
        await py_agent.hooks.wait_for("session_up")
        await relay2.expect_connected(DEVICE)
        response = await http_request(relay2.http_port, "GET", via("/hello"))
    assert (response.status, response.body) == (200, b"hello from local-1")


async def test_py_agent_replaced_backs_off(
    nursery: trio.Nursery, go_relay: GoRelay, local: LocalServer
) -> None:
    slow = ClientConfig(backoff_base=60.0, backoff_cap=60.0, backoff_jitter=0.0)
    with trio.fail_after(TEST_TIMEOUT):
        older = await start_py_agent(nursery, go_relay.tunnel_url, TOKEN, local.port, config=slow)
        await older.hooks.wait_for("session_up")
        await go_relay.expect_connected(DEVICE)

        local2 = await start_local_server(nursery, "local-2")
        newer = await start_py_agent(nursery, go_relay.tunnel_url, TOKEN, local2.port)
        await newer.hooks.wait_for("session_up")
        await go_relay.expect_connected(DEVICE)
        await go_relay.expect_disconnected(DEVICE)  # the older one

        _, error = await older.hooks.wait_for("session_down")
        assert isinstance(error, Replaced)
        assert await older.hooks.next() == ("retry_scheduled", 1, 60.0)
        assert older.client.state is ClientState.RECONNECTING

        response = await http_request(go_relay.http_port, "GET", via("/hello"))
        assert response.body == b"hello from local-2"
    assert older.hooks.count("dial_attempt") == 1


async def test_py_agent_with_a_bad_token_is_refused_and_backs_off_by_the_cap(
    nursery: trio.Nursery, go_relay: GoRelay
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_py_agent(nursery, go_relay.tunnel_url, "wrong", 9)
        _, attempt, error = await agent.hooks.wait_for("dial_failed")
        assert attempt == 1
        assert isinstance(error, TokenRefused) and error.status_code == 401
        _, attempt, delay = await agent.hooks.next()
        assert (attempt, delay) == (1, agent.client.config.backoff_cap)


async def test_py_agent_with_its_local_server_down_answers_502(
    nursery: trio.Nursery, go_relay: GoRelay
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_py_agent(nursery, go_relay.tunnel_url, TOKEN, closed_port())
        await agent.hooks.wait_for("session_up")
        await go_relay.expect_connected(DEVICE)
        response = await http_request(go_relay.http_port, "GET", via("/hello"))
        assert response.status == 502
        assert response.body.startswith(b"local server unreachable")
        upgrade = await websocket_handshake(go_relay.http_port, f"/ws/{DEVICE}/ws/echo")
    assert upgrade.status == 502  # our agent's 502, passed on by the Go relay before upgrading


async def test_py_agent_stops_when_the_go_relay_caller_gives_up_mid_download(
    go_relay: GoRelay, py_agent: PyAgent, local: LocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        status = await hang_up_mid_download(go_relay.http_port, via(f"/bytes/{1024 * MiB}"))
        assert status == 200
        # Go relay: FIN on the stream -> our agent: stop the local request -> disconnect
        await local.app.download_aborted.wait()
        response = await http_request(go_relay.http_port, "GET", via("/hello"))
    assert response.status == 200
