"""The tunnel listener, with our agent (``TunnelClient``) dialling it: token checks before
the upgrade, one tunnel per device, replacement, draining, health, metrics, and traffic
through the tunnel to the agent's local server.

The listener is the one production runs (``serve_tunnels``: the library's listener with the
service's admission), through ``support.tunnellistener`` on 127.0.0.1, plain or over TLS with a
throwaway CA (``trustme``). The agent's local server is ``support.tunnelhttp.LocalApp``.
Waits are on hooks and registry events, each bounded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
import trustme
from support.data import pattern, pattern_body, pattern_sha256
from support.pyagent import FAST, PyAgent, start_py_agent
from support.pyrelay import fetch, fetch_digest
from support.tunnelhttp import LocalServer, http_request, start_local_server
from support.tunnellistener import TunnelListener, start_tunnel_listener

from visiona_services.common.envconfig import ConfigError
from visiona_services.remote_proxy.config import ProxyConfig
from visiona_services.remote_proxy.service import RunningProxy, serve_remote_proxy
from visiona_services.remote_proxy.tunnel_listener import TUNNEL_MAX_MESSAGE_SIZE
from visiona_services.remote_proxy.verify import ApiServerVerifier
from visiona_tunnel.client import ClientConfig, Replaced, TokenRefused
from visiona_tunnel.relay import Tunnel
from visiona_tunnel.wsconn import (
    CLOSE_REPLACED,
    WebSocketClosed,
    WebSocketRejected,
    connect_websocket_stream,
)

from .fakeapi import start_fake_api_server

MiB = 1024 * 1024
TOKEN = "token-1"
DEVICE = "device-1"
#: Upper bound for one test body.
TEST_TIMEOUT = 30.0
#: An agent that does not come back within a test once it was replaced.
NO_RETRY = ClientConfig(backoff_base=600.0, backoff_cap=600.0, connect_timeout=5.0)


@pytest.fixture
async def listener(nursery: trio.Nursery) -> TunnelListener:
    return await start_tunnel_listener(nursery, {TOKEN: DEVICE})


@pytest.fixture
async def agent(nursery: trio.Nursery, listener: TunnelListener, local: LocalServer) -> PyAgent:
    """Our agent for DEVICE, online."""
    agent = await start_py_agent(nursery, listener.url, TOKEN, local.port)
    await agent.hooks.wait_for("session_up")
    return agent


@pytest.fixture
async def tunnel(listener: TunnelListener, agent: PyAgent) -> Tunnel:
    """The listener's tunnel to our agent."""
    with trio.fail_after(10):
        return await listener.state.tunnels.wait_for(DEVICE)


async def refused(url: str, headers: list[tuple[str, str]] | None = None) -> WebSocketRejected:
    """Dial ``url`` expecting the upgrade to be refused; the refusal."""
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(WebSocketRejected) as info:
        ws = await connect_websocket_stream(url, headers=headers or [])
        await ws.aclose()
    return info.value


def envelope(rejection: WebSocketRejected) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(rejection.body)
    return document


def header(rejection: WebSocketRejected, name: bytes) -> bytes | None:
    values = [value for key, value in rejection.headers if key.lower() == name]
    return values[-1] if values else None


# -- agents come up ---------------------------------------------------------------------------


async def test_agent_comes_up_keyed_by_device(listener: TunnelListener, tunnel: Tunnel) -> None:
    assert tunnel.key == DEVICE
    assert tunnel.remote_address is not None
    assert tunnel.remote_address.startswith("127.0.0.1:")
    assert len(listener.state.tunnels) == 1


async def test_connect_is_counted(listener: TunnelListener, tunnel: Tunnel) -> None:
    assert listener.state.metrics.value("visiona_tunnel_connects_total") == 1


async def test_bearer_header_is_accepted(listener: TunnelListener) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        ws = await connect_websocket_stream(
            listener.url, headers=[("Authorization", f"Bearer {TOKEN}")]
        )
        async with ws:
            tunnel = await listener.state.tunnels.wait_for(DEVICE)
            assert tunnel.key == DEVICE


async def test_agent_leaving_ends_its_tunnel(listener: TunnelListener, agent: PyAgent) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await listener.state.tunnels.wait_for(DEVICE)
        agent.client.stop()
        down = await listener.events.next_down()
    assert (down.key, down.replaced) == (DEVICE, False)
    assert len(listener.state.tunnels) == 0
    assert listener.state.metrics.value("visiona_tunnel_disconnects_total") == 1


# -- traffic ----------------------------------------------------------------------------------


async def test_get_through_the_tunnel(tunnel: Tunnel) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch(tunnel, "GET", "/hello?x=1")
    assert (response.status, response.body) == (200, b"hello from local-1")
    assert response.header(b"x-query") == b"x=1"


async def test_download_20_mib_is_byte_exact(tunnel: Tunnel) -> None:
    size = 20 * MiB
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch_digest(tunnel, "GET", f"/bytes/{size}")
    assert response.status == 200
    assert (response.size, response.sha256) == (size, pattern_sha256(size))


async def test_upload_20_mib_is_byte_exact(tunnel: Tunnel) -> None:
    size = 20 * MiB
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch(tunnel, "POST", "/sha256", body=pattern_body(size))
    assert (response.status, response.body) == (200, f"{size} {pattern_sha256(size)}".encode())


async def test_post_echo_through_the_tunnel(tunnel: Tunnel) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch(tunnel, "POST", "/echo", body=pattern(0, MiB))
    assert (response.status, response.body) == (200, pattern(0, MiB))


# -- refusals before the upgrade -------------------------------------------------------------


async def test_missing_token_is_401_with_the_error_envelope(listener: TunnelListener) -> None:
    rejection = await refused(listener.url)
    assert rejection.status_code == 401
    document = envelope(rejection)
    assert document == {
        "success": False,
        "error": {
            "code": "UNAUTHORIZED",
            "message": "a valid device token is required",
            "request_id": document["error"]["request_id"],
        },
    }
    assert document["error"]["request_id"]
    assert header(rejection, b"content-type") == b"application/json"


async def test_unknown_token_is_the_same_401(listener: TunnelListener) -> None:
    missing = envelope(await refused(listener.url))
    unknown = await refused(listener.url + "?token=nope")
    assert unknown.status_code == 401
    document = envelope(unknown)
    assert document["error"]["code"] == "UNAUTHORIZED"
    assert document["error"]["message"] == missing["error"]["message"]


async def test_unknown_bearer_token_is_401(listener: TunnelListener) -> None:
    rejection = await refused(listener.url, [("Authorization", "Bearer nope")])
    assert rejection.status_code == 401


async def test_refusals_are_counted_as_auth_failures(listener: TunnelListener) -> None:
    await refused(listener.url)
    await refused(listener.url + "?token=nope")
    assert listener.state.metrics.value("visiona_tunnel_auth_failures_total") == 2
    assert listener.state.metrics.value("visiona_tunnel_connects_total") == 0


async def test_caller_request_id_is_echoed(listener: TunnelListener) -> None:
    rejection = await refused(listener.url, [("X-Request-ID", "req-42")])
    assert envelope(rejection)["error"]["request_id"] == "req-42"
    assert header(rejection, b"x-request-id") == b"req-42"


async def test_tokens_are_not_logged(
    listener: TunnelListener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await refused(listener.url + "?token=s3cret-token-value")
    assert "s3cret-token-value" not in caplog.text


async def test_token_refused_agent_reports_it(
    nursery: trio.Nursery, listener: TunnelListener
) -> None:
    agent = await start_py_agent(nursery, listener.url, "nope", 9, config=NO_RETRY)
    _, _, error = await agent.hooks.wait_for("dial_failed")
    assert isinstance(error, TokenRefused)
    assert error.status_code == 401
    agent.client.stop()


# -- one tunnel per device ------------------------------------------------------------------


async def test_reconnect_replaces_the_old_tunnel_with_4001(
    nursery: trio.Nursery, listener: TunnelListener, local: LocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        older = await start_py_agent(nursery, listener.url, TOKEN, local.port, config=NO_RETRY)
        await older.hooks.wait_for("session_up")
        first = await listener.state.tunnels.wait_for(DEVICE)

        local2 = await start_local_server(nursery, "local-2")
        newer = await start_py_agent(nursery, listener.url, TOKEN, local2.port)
        await newer.hooks.wait_for("session_up")
        _, error = await older.hooks.wait_for("session_down")
        assert isinstance(error, Replaced)
        down = await listener.events.next_down()
        assert (down.tunnel, down.replaced) == (first, True)

        tunnel = await listener.state.tunnels.wait_for(DEVICE)
        assert tunnel is not first
        response = await fetch(tunnel, "GET", "/hello")
    assert response.body == b"hello from local-2"
    metrics = listener.state.metrics
    assert metrics.value("visiona_tunnel_connects_total") == 2
    assert metrics.value("visiona_tunnel_replacements_total") == 1
    older.client.stop()


# -- draining, health -----------------------------------------------------------------------


async def test_draining_refuses_new_tunnels_with_503(listener: TunnelListener) -> None:
    listener.state.draining.set()
    rejection = await refused(f"{listener.url}?token={TOKEN}")
    assert rejection.status_code == 503
    assert envelope(rejection)["error"]["code"] == "DRAINING"
    assert listener.state.metrics.value("visiona_tunnel_auth_failures_total") == 0


async def test_healthz_counts_sessions(listener: TunnelListener, tunnel: Tunnel) -> None:
    response = await http_request(listener.port, "GET", "/healthz")
    assert response.status == 200
    assert json.loads(response.body) == {"success": True, "data": {"status": "ok", "sessions": 1}}


async def test_quart_responses_carry_the_request_id(listener: TunnelListener) -> None:
    response = await http_request(
        listener.port, "GET", "/healthz", headers=[("connection", "close"), ("x-request-id", "r-7")]
    )
    assert response.headers["x-request-id"] == "r-7"


async def test_healthz_while_draining_is_503(listener: TunnelListener) -> None:
    listener.state.draining.set()
    response = await http_request(listener.port, "GET", "/healthz")
    assert response.status == 503
    assert json.loads(response.body)["error"]["code"] == "DRAINING"


async def test_plain_get_of_the_tunnel_path_is_426(listener: TunnelListener) -> None:
    response = await http_request(listener.port, "GET", "/tunnel/connect?token=x")
    assert response.status == 426
    assert json.loads(response.body)["error"]["code"] == "UPGRADE_REQUIRED"


async def test_unknown_path_is_404_with_the_envelope(listener: TunnelListener) -> None:
    response = await http_request(listener.port, "GET", "/nope")
    assert response.status == 404
    assert json.loads(response.body)["error"]["code"] == "NOT_FOUND"
    assert response.headers["x-request-id"]


async def test_post_to_healthz_is_405(listener: TunnelListener) -> None:
    response = await http_request(listener.port, "POST", "/healthz", body=b"{}")
    assert response.status == 405
    assert json.loads(response.body)["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert "GET" in response.headers["allow"]


async def test_healthz_keeps_the_connection_alive(listener: TunnelListener) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", listener.port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            for _ in range(2):
                request = h11.Request(method="GET", target="/healthz", headers=[("host", "x")])
                await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                events: list[h11.Event] = []
                while not events or not isinstance(events[-1], h11.EndOfMessage):
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(64 * 1024))
                    else:
                        assert isinstance(event, h11.Event), event
                        events.append(event)
                response = events[0]
                assert isinstance(response, h11.Response)
                assert response.status_code == 200
                conn.start_next_cycle()


async def test_upgrade_without_a_websocket_key_is_400(listener: TunnelListener) -> None:
    headers = [("connection", "Upgrade"), ("upgrade", "websocket")]
    response = await http_request(
        listener.port, "GET", f"/tunnel/connect?token={TOKEN}", headers=headers
    )
    assert response.status == 400
    assert listener.state.metrics.value("visiona_tunnel_auth_failures_total") == 0


async def test_listener_shuts_down_with_idle_connections(nursery: trio.Nursery) -> None:
    listener = await start_tunnel_listener(nursery, {TOKEN: DEVICE})
    with trio.fail_after(TEST_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", listener.port)
        async with stream:
            listener.shutdown.set()
            # the idle connection is closed (within the handshake timeout, not at it)
            with trio.fail_after(2):
                assert await stream.receive_some(1024) == b""
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", listener.port)


async def test_service_runs_the_tunnel_listener(nursery: trio.Nursery) -> None:
    config = ProxyConfig(
        internal_secret="s", tunnel_host="127.0.0.1", tunnel_port=0, internal_port=0
    )
    with trio.fail_after(TEST_TIMEOUT):
        proxy: RunningProxy = await nursery.start(serve_remote_proxy, config)
        port = int(proxy.tunnel_urls[0].rsplit(":", 1)[1])
        assert proxy.tunnel_urls == [f"ws://127.0.0.1:{port}"]
        response = await http_request(port, "GET", "/healthz")
        assert response.status == 200
        proxy.stop()


def test_a_go_agents_largest_message_fits() -> None:
    # A Go agent with a 16 MiB window sends 16 MiB + 12 bytes in one message.
    assert 32 * MiB + 12 <= TUNNEL_MAX_MESSAGE_SIZE


# -- the api-server as verifier ---------------------------------------------------------------


@pytest.fixture
async def api_listener(nursery: trio.Nursery) -> AsyncIterator[TunnelListener]:
    """The tunnel listener asking the fake api-server (``fakeapi``) about tokens:
    ``good-9`` is device ``dev-9``, ``status-N`` gets HTTP N from it."""
    api = await start_fake_api_server(nursery)
    async with ApiServerVerifier(api.url, "s") as verifier:
        yield await start_tunnel_listener(nursery, verifier=verifier)


async def test_api_server_verified_agent_comes_up(
    nursery: trio.Nursery, local: LocalServer, api_listener: TunnelListener
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_py_agent(nursery, api_listener.url, "good-9", local.port)
        await agent.hooks.wait_for("session_up")
        tunnel = await api_listener.state.tunnels.wait_for("dev-9")
        assert (await fetch(tunnel, "GET", "/hello")).status == 200
    agent.client.stop()


async def test_api_server_refusal_is_401(api_listener: TunnelListener) -> None:
    rejection = await refused(f"{api_listener.url}?token=status-404")
    assert rejection.status_code == 401
    assert api_listener.state.metrics.value("visiona_tunnel_auth_failures_total") == 1


async def test_api_server_failure_is_503_not_401(api_listener: TunnelListener) -> None:
    rejection = await refused(f"{api_listener.url}?token=status-500")
    assert rejection.status_code == 503
    assert envelope(rejection)["error"]["code"] == "AUTH_UNAVAILABLE"
    assert api_listener.state.metrics.value("visiona_tunnel_auth_failures_total") == 0


async def test_agent_still_writing_gets_our_close_code(listener: TunnelListener) -> None:
    # Unless the listener reads what the agent still sends after our close frame (it
    # half-closes and reads until the agent closes), an agent still writing gets a reset
    # instead of close 4001.
    with trio.fail_after(TEST_TIMEOUT):
        ws = await connect_websocket_stream(f"{listener.url}?token={TOKEN}")
        async with ws:
            tunnel = await listener.state.tunnels.wait_for(DEVICE)
            await tunnel.close(CLOSE_REPLACED, "replaced")
            for _ in range(30):
                await ws.send_all(b"x" * 1024)
            with pytest.raises(WebSocketClosed) as info:
                while await ws.receive_some():
                    pass
            assert info.value.code == CLOSE_REPLACED
            # Our close reply went out with that read; the server ends the connection.
            assert await ws.transport.receive_some(1024) == b""


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="needs TCP_USER_TIMEOUT")
async def test_agent_that_stops_reading_is_dropped(nursery: trio.Nursery) -> None:
    # hypercorn's socket writes cannot be cancelled; the kernel's TCP_USER_TIMEOUT ends
    # the connection once the agent's receive window has stayed at zero that long. (The
    # raw listener's writes can be, and it sets the option too.)
    listener = await start_tunnel_listener(nursery, {TOKEN: DEVICE}, tcp_user_timeout=1.0)
    with trio.fail_after(TEST_TIMEOUT):
        ws = await connect_websocket_stream(f"{listener.url}?token={TOKEN}")
        assert isinstance(ws.transport, trio.SocketStream)
        ws.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        async with ws:  # never read
            tunnel = await listener.state.tunnels.wait_for(DEVICE)

            async def push() -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    stream = await tunnel.open_stream()
                    await stream.send_all(b"x" * 256 * 1024)

            async with trio.open_nursery() as pushers:
                for _ in range(100):
                    pushers.start_soon(push)
                down = await listener.events.next_down(timeout=TEST_TIMEOUT)
    assert (down.key, down.tunnel) == (DEVICE, tunnel)
    assert len(listener.state.tunnels) == 0


# -- wss:// directly ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_listener(nursery: trio.Nursery, ca: trustme.CA) -> TunnelListener:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    return await start_tunnel_listener(nursery, {TOKEN: DEVICE}, ssl_context=server_context)


def trusting(ca: trustme.CA) -> ClientConfig:
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return attrs.evolve(FAST, ssl_context=client_context)


async def test_an_agent_reaches_its_local_server_over_wss(
    nursery: trio.Nursery, tls_listener: TunnelListener, local: LocalServer, ca: trustme.CA
) -> None:
    assert tls_listener.url.startswith("wss://")
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_py_agent(
            nursery, tls_listener.url, TOKEN, local.port, config=trusting(ca)
        )
        await agent.hooks.wait_for("session_up")
        tunnel = await tls_listener.state.tunnels.wait_for(DEVICE)
        body = pattern(0, 1 * MiB)
        response = await fetch(tunnel, "POST", "/echo", body=body)
    assert response.body == body
    agent.client.stop()


async def test_a_replaced_agent_gets_4001_over_wss(
    nursery: trio.Nursery, tls_listener: TunnelListener, local: LocalServer, ca: trustme.CA
) -> None:
    config = attrs.evolve(trusting(ca), backoff_base=600.0, backoff_cap=600.0)
    with trio.fail_after(TEST_TIMEOUT):
        older = await start_py_agent(nursery, tls_listener.url, TOKEN, local.port, config=config)
        await older.hooks.wait_for("session_up")
        newer = await start_py_agent(
            nursery, tls_listener.url, TOKEN, local.port, config=trusting(ca)
        )
        await newer.hooks.wait_for("session_up")
        _, error = await older.hooks.wait_for("session_down")
    assert isinstance(error, Replaced)
    older.client.stop()
    newer.client.stop()


async def test_an_agent_that_does_not_trust_the_certificate_never_comes_up(
    tls_listener: TunnelListener,
) -> None:
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(trio.BrokenResourceError):
        await connect_websocket_stream(f"{tls_listener.url}?token={TOKEN}")
    assert len(tls_listener.state.tunnels) == 0


async def test_a_plain_request_to_the_tls_listener_gets_no_answer(
    tls_listener: TunnelListener,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", tls_listener.port)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            received = b""
            while chunk := await stream.receive_some(1024):
                received += chunk
    assert b"HTTP/1.1 200" not in received


def test_tls_needs_both_certificate_and_key(tmp_path: Path, ca: trustme.CA) -> None:
    base = {"VISIONA_INTERNAL_SECRET": "s"}
    with pytest.raises(ConfigError, match="set both or neither"):
        ProxyConfig.from_env({**base, "VISIONA_TUNNEL_TLS_CERT": "cert.pem"})
    missing = {"VISIONA_TUNNEL_TLS_CERT": str(tmp_path / "no.pem"), "VISIONA_TUNNEL_TLS_KEY": "x"}
    with pytest.raises(ConfigError, match="cannot load"):
        ProxyConfig.from_env({**base, **missing})
    leaf = ca.issue_cert("relay.example")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    env = {**base, "VISIONA_TUNNEL_TLS_CERT": str(cert), "VISIONA_TUNNEL_TLS_KEY": str(key)}
    assert ProxyConfig.from_env(env).tunnel_ssl_context() is not None


async def test_the_service_serves_wss_when_configured(
    nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA
) -> None:
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    config = ProxyConfig(
        internal_secret="s",
        tunnel_host="127.0.0.1",
        tunnel_port=0,
        internal_port=0,
        tunnel_tls_cert=str(cert),
        tunnel_tls_key=str(key),
        static_tokens=f"{TOKEN}={DEVICE}",
    )
    with trio.fail_after(TEST_TIMEOUT):
        proxy: RunningProxy = await nursery.start(serve_remote_proxy, config)
        assert proxy.tunnel_urls[0].startswith("wss://127.0.0.1:")
        context = ssl.create_default_context()
        ca.configure_trust(context)
        ws = await connect_websocket_stream(
            f"{proxy.tunnel_urls[0]}/tunnel/connect?token={TOKEN}", ssl_context=context
        )
        async with ws:
            assert (await proxy.state.tunnels.wait_for(DEVICE)).key == DEVICE
        proxy.stop()
