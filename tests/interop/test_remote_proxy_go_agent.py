"""The Go agent (``goagent``: gorilla/websocket + hashicorp/yamux) against the remote-proxy's
tunnel listener (``serve_tunnels``, ``support.tunnellistener``): it comes up,
traffic goes through it byte for byte, a newer agent replaces it with close 4001, a bad
token gets 401. Waits are on the agent's stdout lines and the registry, each bounded.
"""

from __future__ import annotations

import pytest
import trio
from support.data import pattern_body, pattern_sha256
from support.pyrelay import fetch, fetch_digest
from support.tunnelhttp import LocalServer, start_local_server
from support.tunnellistener import TunnelListener, start_tunnel_listener

from visiona_tunnel.relay import Tunnel
from visiona_tunnel.wsconn import CLOSE_REPLACED

from .tunnelpeers import GoAgent, Retry, TunnelPeerBinaries, start_go_agent

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
TOKEN = "token-1"
DEVICE = "device-1"
#: Upper bound for one test body.
TEST_TIMEOUT = 60.0


@pytest.fixture
async def listener(nursery: trio.Nursery) -> TunnelListener:
    return await start_tunnel_listener(nursery, {TOKEN: DEVICE})


@pytest.fixture
async def go_agent(
    nursery: trio.Nursery,
    tunnel_peers: TunnelPeerBinaries,
    listener: TunnelListener,
    local: LocalServer,
) -> GoAgent:
    agent = await start_go_agent(
        nursery, tunnel_peers, relay_url=listener.url, token=TOKEN, local=local.address
    )
    await agent.expect_online()
    return agent


@pytest.fixture
async def go_tunnel(listener: TunnelListener, go_agent: GoAgent) -> Tunnel:
    with trio.fail_after(10):
        return await listener.state.tunnels.wait_for(DEVICE)


async def test_go_agent_get(go_tunnel: Tunnel) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch(go_tunnel, "GET", "/hello?x=1")
    assert (response.status, response.body) == (200, b"hello from local-1")
    assert response.header(b"x-query") == b"x=1"


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


async def test_go_agent_replaced_gets_4001(
    nursery: trio.Nursery,
    tunnel_peers: TunnelPeerBinaries,
    listener: TunnelListener,
    local: LocalServer,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        older = await start_go_agent(
            nursery,
            tunnel_peers,
            relay_url=listener.url,
            token=TOKEN,
            local=local.address,
            extra_args=["-backoff-base", "1m", "-backoff-cap", "1m"],
        )
        await older.expect_online()
        first = await listener.state.tunnels.wait_for(DEVICE)

        local2 = await start_local_server(nursery, "local-2")
        newer = await start_go_agent(
            nursery, tunnel_peers, relay_url=listener.url, token=TOKEN, local=local2.address
        )
        await newer.expect_online()
        reason = await older.expect_offline()
        assert reason.startswith(f"websocket: close {CLOSE_REPLACED}"), reason
        assert await older.expect_retry() == Retry(1, "1m0s", "replaced")
        assert first.replaced

        tunnel = await listener.state.tunnels.wait_for(DEVICE)
        response = await fetch(tunnel, "GET", "/hello")
        assert response.body == b"hello from local-2"
        assert await older.terminate() == 0


async def test_go_agent_with_a_bad_token_gets_401(
    nursery: trio.Nursery, tunnel_peers: TunnelPeerBinaries, listener: TunnelListener
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_go_agent(
            nursery, tunnel_peers, relay_url=listener.url, token="wrong", local="127.0.0.1:9"
        )
        assert await agent.expect_retry() == Retry(1, "30s", "unauthorized")
        assert len(listener.state.tunnels) == 0
        assert listener.state.metrics.value("visiona_tunnel_auth_failures_total") == 1
        assert await agent.terminate() == 0
