"""The Go tunnel peers against each other: browser -> gorelay -> yamux over WS -> goagent -> local.

These tests prove ``tunnelpeers/`` (``goagent``, ``gorelay``) before they are used to test
our Python agent and relay. The local server, the HTTP client and the WebSocket
"browser" are in ``tests/support/tunnelhttp.py``. Tests wait for the peers' stdout lines,
never sleep, and every wait is bounded.
"""

from __future__ import annotations

import pytest
import trio
from support.tunnelhttp import (
    LocalServer,
    browser_websocket,
    closed_port,
    hang_up_mid_download,
    http_request,
    start_local_server,
    websocket_handshake,
)
from trio_websocket import ConnectionClosed

from .gopeer import pattern, sha256_hex
from .tunnelpeers import (
    CLOSE_REPLACED,
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

# -- fixtures: a relay, an agent connected through it (``local``: tests/conftest.py) ------


@pytest.fixture
async def relay(nursery: trio.Nursery, tunnel_peers: TunnelPeerBinaries) -> GoRelay:
    return await start_go_relay(nursery, tunnel_peers, {TOKEN: DEVICE})


@pytest.fixture
async def agent(
    nursery: trio.Nursery, tunnel_peers: TunnelPeerBinaries, relay: GoRelay, local: LocalServer
) -> GoAgent:
    """A goagent for DEVICE, online; torn down (SIGTERM) before the relay."""
    agent = await start_go_agent(
        nursery, tunnel_peers, relay_url=relay.tunnel_url, token=TOKEN, local=local.address
    )
    await agent.expect_online()
    await relay.expect_connected(DEVICE)
    return agent


def forward(path: str, device: str = DEVICE) -> str:
    return f"/forward/{device}{path}"


# -- HTTP through the tunnel --------------------------------------------------------------


async def test_get_and_head_with_query(relay: GoRelay, agent: GoAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await http_request(relay.http_port, "GET", forward("/hello?x=1&y=%2F"))
        assert (response.status, response.body) == (200, b"hello from local-1")
        assert response.headers["x-query"] == "x=1&y=%2F"
        head = await http_request(relay.http_port, "HEAD", forward("/hello"))
        assert (head.status, head.body) == (200, b"")
        assert head.headers["content-length"] == str(len(b"hello from local-1"))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_post_echo_1mib(relay: GoRelay, agent: GoAgent, chunked: bool) -> None:
    data = pattern(3, MiB)
    with trio.fail_after(TEST_TIMEOUT):
        response = await http_request(
            relay.http_port, "POST", forward("/echo"), data, chunked=chunked
        )
    assert response.status == 200
    assert len(response.body) == MiB and response.body == data


@pytest.mark.parametrize("query", ["", "?cl=1"], ids=["chunked", "content-length"])
async def test_download_20mib_sha256(relay: GoRelay, agent: GoAgent, query: str) -> None:
    size = 20 * MiB
    with trio.fail_after(TEST_TIMEOUT):
        response = await http_request(relay.http_port, "GET", forward(f"/bytes/{size}{query}"))
    assert response.status == 200
    assert ("content-length" in response.headers) == (query == "?cl=1")
    assert len(response.body) == size
    assert sha256_hex(response.body) == sha256_hex(pattern(0, size))


async def test_status_codes_pass_through_and_redirects_are_not_followed(
    relay: GoRelay, agent: GoAgent
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        for status in (201, 204, 301, 302, 304, 400, 404, 418, 500, 503):
            response = await http_request(relay.http_port, "GET", forward(f"/status/{status}"))
            assert response.status == status
            expected = b"" if status in (204, 304) else f"status {status}".encode()
            assert response.body == expected
            if 300 <= status < 400:
                assert response.headers["location"] == "/hello"


async def test_caller_giving_up_mid_download_stops_the_agent(
    relay: GoRelay, agent: GoAgent, local: LocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        status = await hang_up_mid_download(relay.http_port, forward(f"/bytes/{1024 * MiB}"))
        assert status == 200
        # relay: FIN on the stream -> agent: cancel the local request -> hypercorn: disconnect
        await local.app.download_aborted.wait()
        response = await http_request(relay.http_port, "GET", forward("/hello"))
        assert response.status == 200


async def test_no_session_is_502_tunnel_disconnected(relay: GoRelay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await http_request(relay.http_port, "GET", forward("/hello", "device-2"))
        assert (response.status, response.body) == (502, b"TUNNEL_DISCONNECTED")
        response = await websocket_handshake(relay.http_port, "/ws/device-2/ws/echo")
        assert (response.status, response.body) == (502, b"TUNNEL_DISCONNECTED")


async def test_local_server_down_is_502(
    nursery: trio.Nursery, tunnel_peers: TunnelPeerBinaries, relay: GoRelay
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await start_go_agent(
            nursery,
            tunnel_peers,
            relay_url=relay.tunnel_url,
            token=TOKEN,
            local=f"127.0.0.1:{closed_port()}",
        )
        await relay.expect_connected(DEVICE)
        response = await http_request(relay.http_port, "GET", forward("/hello"))
        assert response.status == 502
        assert response.body.startswith(b"local server unreachable")
        response = await websocket_handshake(relay.http_port, f"/ws/{DEVICE}/ws/echo")
        assert response.status == 502  # the agent's 502, passed on before the upgrade


# -- WebSocket through the tunnel -----------------------------------------------------------


async def test_websocket_echo_and_close_codes(
    relay: GoRelay, agent: GoAgent, local: LocalServer
) -> None:
    resource = f"/ws/{DEVICE}/ws/echo"
    with trio.fail_after(TEST_TIMEOUT):
        async with browser_websocket(relay.http_port, resource) as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            data = pattern(5, 3 * MiB)  # gorilla fragments it; trio-websocket reassembles
            await ws.send_message(data)
            assert await ws.get_message() == data
            await ws.send_message("close-4002")  # the local server closes: 4002 "bye"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            reason = closed.value.reason
            assert reason is not None
            assert (reason.code, reason.reason) == (4002, "bye")

        # The browser closes: the local server sees the close.
        async with browser_websocket(relay.http_port, resource) as ws:
            await ws.send_message(b"\x00\x01")
            assert await ws.get_message() == b"\x00\x01"
            await ws.aclose(code=4005, reason="browser leaves")
        await local.app.ws_disconnected.wait()


# -- agent lifecycle ---------------------------------------------------------------------------


async def test_a_newer_agent_replaces_the_older_which_gets_4001_and_backs_off(
    nursery: trio.Nursery, tunnel_peers: TunnelPeerBinaries, relay: GoRelay, local: LocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        # A long base delay keeps the replaced agent from taking the device back mid-test.
        older = await start_go_agent(
            nursery,
            tunnel_peers,
            relay_url=relay.tunnel_url,
            token=TOKEN,
            local=local.address,
            extra_args=["-backoff-base", "1m", "-backoff-cap", "1m"],
        )
        await older.expect_online()
        await relay.expect_connected(DEVICE)

        local2 = await start_local_server(nursery, "local-2")
        newer = await start_go_agent(
            nursery, tunnel_peers, relay_url=relay.tunnel_url, token=TOKEN, local=local2.address
        )
        await newer.expect_online()
        await relay.expect_connected(DEVICE)
        await relay.expect_disconnected(DEVICE)  # the older one
        reason = await older.expect_offline()
        assert reason == f"websocket: close {CLOSE_REPLACED}: replaced"
        assert await older.expect_retry() == Retry(1, "1m0s", "replaced")

        response = await http_request(relay.http_port, "GET", forward("/hello"))
        assert response.body == b"hello from local-2"
        assert await older.terminate() == 0  # exits cleanly while backing off


async def test_a_session_that_was_up_resets_the_backoff(relay: GoRelay, agent: GoAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await http_request(relay.http_port, "POST", f"/close/{DEVICE}?code=1000")
        assert response.status == 204
        assert await agent.expect_offline() == "websocket: close 1000 (normal)"
        await agent.expect_online()  # at once: no AGENT RETRY line in between
        # The old session's end and the new session's start race in the relay.
        events = {await relay.next_event(), await relay.next_event()}
        assert events == {("DISCONNECTED", DEVICE), ("CONNECTED", DEVICE)}
        response = await http_request(relay.http_port, "GET", forward("/hello"))
        assert response.status == 200


async def test_failed_dials_back_off_exponentially(
    nursery: trio.Nursery, tunnel_peers: TunnelPeerBinaries
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_go_agent(
            nursery,
            tunnel_peers,
            relay_url=f"ws://127.0.0.1:{closed_port()}/tunnel/connect",
            token=TOKEN,
            local="127.0.0.1:9",
        )
        assert await agent.expect_retry() == Retry(1, "1s", "dial-failed")
        assert await agent.expect_retry() == Retry(2, "2s", "dial-failed")
        assert await agent.terminate() == 0


async def test_a_rejected_token_backs_off_to_the_cap(
    nursery: trio.Nursery, tunnel_peers: TunnelPeerBinaries, relay: GoRelay
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_go_agent(
            nursery, tunnel_peers, relay_url=relay.tunnel_url, token="wrong", local="127.0.0.1:9"
        )
        assert await agent.expect_retry() == Retry(1, "30s", "unauthorized")
        assert await agent.terminate() == 0


async def test_agent_and_relay_exit_cleanly_on_sigterm(relay: GoRelay, agent: GoAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert await agent.terminate() == 0
        assert await agent.expect_offline() == "context canceled"
        await relay.expect_disconnected(DEVICE)
        assert await relay.peer.terminate() == 0
