"""The whole tunnel in one process: caller -> our relay -> yamux over WebSocket -> our agent
(``TunnelClient``) -> a local hypercorn server, and back.

The relay is ``serve_tunnel_listener`` + ``TunnelRegistry`` on 127.0.0.1 (``support.pyrelay``);
the caller is ``Tunnel.request`` / ``Tunnel.open_stream``; the local server is
``support.tunnelhttp.LocalApp``. Waits are on hooks, states and events, each bounded.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import cast

import pytest
import trio
from support.data import pattern, pattern_body, pattern_sha256
from support.pyagent import FAST, HookRecorder, PyAgent, start_py_agent
from support.pyrelay import (
    MEMORY_BOUND,
    PyRelay,
    fetch,
    fetch_digest,
    hang_up_mid_body,
    start_py_relay,
    traced_peak,
)
from support.tunnelhttp import LocalServer, closed_port, start_local_server

from visiona_tunnel.client import (
    ClientConfig,
    ClientState,
    RelayBusy,
    Replaced,
    TokenRefused,
    TunnelClient,
)
from visiona_tunnel.relay import Tunnel
from visiona_tunnel.wsconn import CLOSE_REPLACED, client_handshake

MiB = 1024 * 1024
TOKEN = "token-1"
DEVICE = "device-1"
#: Upper bound for one test body.
TEST_TIMEOUT = 30.0


async def start_agent(
    nursery: trio.Nursery,
    relay_url: str,
    local_port: int,
    *,
    token: str = TOKEN,
    config: ClientConfig = FAST,
) -> PyAgent:
    return await start_py_agent(nursery, relay_url, token, local_port, config=config)


def state_of(client: TunnelClient) -> ClientState:
    """``client.state``, read anew (mypy would narrow repeated reads of the property)."""
    return client.state


@pytest.fixture
async def relay(nursery: trio.Nursery) -> PyRelay:
    return await start_py_relay(nursery, {TOKEN: DEVICE})


@pytest.fixture
async def agent(nursery: trio.Nursery, relay: PyRelay, local: LocalServer) -> PyAgent:
    """Our agent for DEVICE, online."""
    agent = await start_agent(nursery, relay.url, local.port)
    await agent.hooks.wait_for("session_up")
    return agent


@pytest.fixture
async def tunnel(relay: PyRelay, agent: PyAgent) -> Tunnel:
    with trio.fail_after(10):
        return await relay.registry.wait_for(DEVICE)


# -- HTTP through the tunnel -------------------------------------------------------------------


async def test_get_passes_query_status_and_headers(tunnel: Tunnel) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch(tunnel, "GET", "/hello?x=1&y=%2F")
    assert (response.status, response.body) == (200, b"hello from local-1")
    assert response.header(b"x-query") == b"x=1&y=%2F"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_post_echo_returns_the_body(tunnel: Tunnel, framing: str) -> None:
    body = pattern(0, MiB) if framing == "content-length" else pattern_body(MiB)
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch(tunnel, "POST", "/echo", body=body)
    assert (response.status, response.body) == (200, pattern(0, MiB))


async def test_download_100_mib_is_byte_exact_with_bounded_memory(tunnel: Tunnel) -> None:
    size = 100 * MiB
    with trio.fail_after(TEST_TIMEOUT):
        async with traced_peak() as peak:
            response = await fetch_digest(tunnel, "GET", f"/bytes/{size}")
    assert response.status == 200
    assert (response.size, response.sha256) == (size, pattern_sha256(size))
    assert peak[0] < MEMORY_BOUND, f"peak {peak[0] / MiB:.1f} MiB"


async def test_upload_50_mib_is_byte_exact_with_bounded_memory(tunnel: Tunnel) -> None:
    size = 50 * MiB
    with trio.fail_after(TEST_TIMEOUT):
        async with traced_peak() as peak:
            response = await fetch(tunnel, "POST", "/sha256", body=pattern_body(size))
    assert response.status == 200
    assert response.body == f"{size} {pattern_sha256(size)}".encode()
    assert peak[0] < MEMORY_BOUND, f"peak {peak[0] / MiB:.1f} MiB"


async def test_200_slow_requests_run_concurrently(tunnel: Tunnel, local: LocalServer) -> None:
    count, delay_ms = 200, 500
    statuses: list[int] = []

    async def one() -> None:
        response = await fetch(tunnel, "GET", f"/slow?ms={delay_ms}")
        assert response.body == f"slept {delay_ms}".encode()
        statuses.append(response.status)

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    assert statuses == [200] * count
    assert local.app.slow_peak >= count // 2, f"at most {local.app.slow_peak} at once"


async def test_status_codes_pass_through_and_redirects_are_not_followed(tunnel: Tunnel) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        for status in (201, 204, 301, 302, 304, 400, 404, 418, 500, 503):
            response = await fetch(tunnel, "GET", f"/status/{status}")
            assert response.status == status
            expected = b"" if status in (204, 304) else f"status {status}".encode()
            assert response.body == expected
            if 300 <= status < 400:
                assert response.header(b"location") == b"/hello"


async def test_request_and_response_headers_pass_through(tunnel: Tunnel) -> None:
    request_headers = [("X-One", "1"), ("x-two", "a"), ("x-two", "b"), ("User-Agent", "e2e")]
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch(tunnel, "GET", "/headers", request_headers)
    assert response.status == 200
    received = [(name, value) for name, value in _json_pairs(response.body) if name != "host"]
    assert received == [("x-one", "1"), ("x-two", "a"), ("x-two", "b"), ("user-agent", "e2e")]
    # Case and repeats of the local server's response headers are kept.
    assert (b"X-Custom", b"Value") in response.headers
    cookies = [value for name, value in response.headers if name.lower() == b"set-cookie"]
    assert cookies == [b"a=1", b"b=2"]


def _json_pairs(body: bytes) -> list[tuple[str, str]]:
    return [(name, value) for name, value in json.loads(body)]


@pytest.mark.parametrize("query", ["", "?cl=1"], ids=["chunked", "content-length"])
async def test_streamed_response_keeps_its_framing(tunnel: Tunnel, query: str) -> None:
    size = 5 * MiB + 123
    with trio.fail_after(TEST_TIMEOUT):
        response = await fetch_digest(tunnel, "GET", f"/bytes/{size}{query}")
    headers = {name.lower(): value for name, value in response.headers}
    if query:
        assert headers[b"content-length"] == str(size).encode()
        assert b"transfer-encoding" not in headers
    else:
        assert headers[b"transfer-encoding"] == b"chunked"
        assert b"content-length" not in headers
    assert (response.size, response.sha256) == (size, pattern_sha256(size))


async def test_caller_giving_up_mid_download_stops_the_local_request(
    tunnel: Tunnel, local: LocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await hang_up_mid_body(tunnel, f"/bytes/{1024 * MiB}")
        # aclose before the end: reset -> the agent stops -> hypercorn sees a disconnect
        await local.app.download_aborted.wait()
        response2 = await fetch(tunnel, "GET", "/hello")
    assert response2.status == 200


async def test_local_server_down_is_502(nursery: trio.Nursery, relay: PyRelay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await start_agent(nursery, relay.url, closed_port())
        tunnel = await relay.registry.wait_for(DEVICE)
        response = await fetch(tunnel, "GET", "/hello")
    assert response.status == 502
    assert response.body.startswith(b"local server unreachable")


# -- WebSocket through the tunnel ----------------------------------------------------------------


async def test_websocket_echo_over_a_raw_stream(tunnel: Tunnel, local: LocalServer) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        stream = await tunnel.open_stream()
        ws = await client_handshake(stream, f"127.0.0.1:{local.port}", "/ws/echo")
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
        await ws.aclose()  # close 1000: the local server sees the disconnect
        await local.app.ws_disconnected.wait()


# -- the agent's life cycle ---------------------------------------------------------------------


async def test_agent_comes_back_after_the_relay_restarts(
    nursery: trio.Nursery, relay: PyRelay, agent: PyAgent
) -> None:
    port = relay.port
    with trio.fail_after(TEST_TIMEOUT):
        await relay.stop()
        await agent.hooks.wait_for("session_down")
        await agent.hooks.wait_for("dial_failed")  # nobody listens now
        await relay.start(nursery)
        assert relay.port == port
        await agent.hooks.wait_for("session_up")
        tunnel = await relay.registry.wait_for(DEVICE)
        response = await fetch(tunnel, "GET", "/hello")
    assert (response.status, response.body) == (200, b"hello from local-1")


async def test_replaced_agent_gets_replaced_and_backs_off(
    nursery: trio.Nursery, relay: PyRelay, local: LocalServer
) -> None:
    slow = ClientConfig(backoff_base=60.0, backoff_cap=60.0, backoff_jitter=0.0)
    with trio.fail_after(TEST_TIMEOUT):
        older = await start_agent(nursery, relay.url, local.port, config=slow)
        await older.hooks.wait_for("session_up")
        first = await relay.registry.wait_for(DEVICE)

        local2 = await start_local_server(nursery, "local-2")
        newer = await start_agent(nursery, relay.url, local2.port)
        await newer.hooks.wait_for("session_up")

        _, error = await older.hooks.wait_for("session_down")
        assert isinstance(error, Replaced)
        assert await older.hooks.next() == ("retry_scheduled", 1, 60.0)
        assert older.client.state is ClientState.RECONNECTING
        assert first.replaced

        tunnel = await relay.registry.wait_for(DEVICE)
        assert tunnel is not first
        response = await fetch(tunnel, "GET", "/hello")
        assert response.body == b"hello from local-2"
    assert older.hooks.count("dial_attempt") == 1  # still backing off
    assert newer.hooks.count("session_down") == 0


async def test_two_agents_sharing_a_token_do_not_flap(
    nursery: trio.Nursery, relay: PyRelay, local: LocalServer
) -> None:
    """Each replacement doubles the replaced agent's delay, so over a window of ``period``
    seconds each agent dials about log2(period / base) times, not hundreds."""
    config = ClientConfig(backoff_base=0.05, backoff_cap=30.0, backoff_jitter=0.0)
    period = 1.5
    with trio.fail_after(TEST_TIMEOUT):
        one = await start_agent(nursery, relay.url, local.port, config=config)
        await one.hooks.wait_for("session_up")
        two = await start_agent(nursery, relay.url, local.port, config=config)
        await two.hooks.wait_for("session_up")
        await one.hooks.wait_for("retry_scheduled")  # the first replacement
        await trio.sleep(period)  # the observation window, not a synchronisation
    dials = one.hooks.count("dial_attempt") + two.hooks.count("dial_attempt")
    # 0.05 + 0.1 + 0.2 + 0.4 + 0.8 > 1.5: at most ~5 redials each, plus the first dials.
    assert dials <= 14, f"{dials} dials in {period} s: {one.hooks.events} {two.hooks.events}"
    delays = [float(cast(float, e[2])) for e in one.hooks.events if e[0] == "retry_scheduled"]
    assert delays == sorted(delays) and len(set(delays)) == len(delays), delays


async def test_bad_token_is_refused_and_backs_off_by_the_cap(
    nursery: trio.Nursery, relay: PyRelay
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_agent(nursery, relay.url, 9, token="wrong")
        assert await agent.hooks.next() == ("dial_attempt", 1)
        name, attempt, error = await agent.hooks.next()
        assert (name, attempt) == ("dial_failed", 1)
        assert isinstance(error, TokenRefused) and error.status_code == 401
        assert await agent.hooks.next() == ("retry_scheduled", 1, FAST.backoff_cap)
        assert agent.client.state is ClientState.RECONNECTING
        assert len(relay.registry) == 0


async def test_hooks_fire_in_order_through_up_down_fail_retry_up(
    nursery: trio.Nursery, relay: PyRelay, local: LocalServer
) -> None:
    config = ClientConfig(backoff_base=0.3, backoff_cap=0.3, backoff_jitter=0.0, redial_spread=0.2)
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_agent(nursery, relay.url, local.port, config=config)
        await agent.hooks.wait_for("session_up")
        await relay.stop()
        await agent.hooks.wait_for("dial_failed")
        await relay.start(nursery)  # the redial in 0.3 s finds it
        await agent.hooks.wait_for("session_up")
    events = agent.hooks.events[:9]  # what stop() adds is another test's
    names = [event[0] for event in events]
    assert names == [
        "dial_attempt",
        "session_up",
        "session_down",
        "retry_scheduled",
        "dial_attempt",
        "dial_failed",
        "retry_scheduled",
        "dial_attempt",
        "session_up",
    ]
    assert events[0] == ("dial_attempt", 1)
    # The session was up: a random moment within the spread, and the count starts over.
    assert events[3][:2] == ("retry_scheduled", 0) and 0 <= cast(float, events[3][2]) <= 0.2
    assert events[4] == ("dial_attempt", 1)
    assert isinstance(events[5][2], OSError)
    assert events[6] == ("retry_scheduled", 1, 0.3)
    assert events[7] == ("dial_attempt", 2)


async def test_agents_cut_off_together_redial_at_moments_spread_over_the_window(
    nursery: trio.Nursery, local: LocalServer
) -> None:
    tokens = {f"token-{n}": f"device-{n}" for n in range(6)}
    relay = await start_py_relay(nursery, tokens)
    config = ClientConfig(redial_spread=5.0, connect_timeout=5.0)
    with trio.fail_after(TEST_TIMEOUT):
        agents = [
            await start_agent(nursery, relay.url, local.port, config=config, token=token)
            for token in tokens
        ]
        for agent in agents:
            await agent.hooks.wait_for("session_up")
        await relay.stop()
        delays = [
            cast(float, (await agent.hooks.wait_for("retry_scheduled"))[2]) for agent in agents
        ]
    assert all(0 <= delay <= 5.0 for delay in delays)
    assert len(set(delays)) == len(delays)  # not in lock-step


@pytest.mark.parametrize(("code", "spread_on"), [(1000, False), (1001, True)])
async def test_a_relay_going_away_spreads_the_first_redial_over_the_restart_window(
    nursery: trio.Nursery, relay: PyRelay, local: LocalServer, code: int, spread_on: bool
) -> None:
    """1001: the relay is restarting, and every agent it had redials now."""
    config = ClientConfig(redial_spread=0.0, restart_spread=60.0, backoff_base=60.0)
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_agent(nursery, relay.url, local.port, config=config)
        await agent.hooks.wait_for("session_up")
        tunnel = await relay.registry.wait_for(DEVICE)
        await tunnel.close(code, "restarting")
        await agent.hooks.wait_for("session_down")
        following = await agent.hooks.next()
    if spread_on:
        assert following[:2] == ("retry_scheduled", 0)
        assert 0 <= cast(float, following[2]) <= 60.0
    else:
        assert following == ("dial_attempt", 1)  # no spread asked for: at once


async def serve_busy_relay(nursery: trio.Nursery, retry_after: bytes) -> int:
    """A relay over its handshake cap: every upgrade is answered 503 with ``Retry-After``."""

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            await stream.send_all(
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: "
                + retry_after
                + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )

    listeners = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    return cast(int, listeners[0].socket.getsockname()[1])


async def test_a_busy_relay_is_redialled_no_sooner_than_its_retry_after_and_spread_above_it(
    nursery: trio.Nursery,
) -> None:
    port = await serve_busy_relay(nursery, b"7")
    config = ClientConfig(backoff_base=1.0, backoff_jitter=0.5)
    with trio.fail_after(TEST_TIMEOUT):
        agents = [
            await start_agent(nursery, f"ws://127.0.0.1:{port}/tunnel/connect", 9, config=config)
            for _ in range(8)
        ]
        failures = [await agent.hooks.wait_for("dial_failed") for agent in agents]
        delays = [cast(float, (await agent.hooks.next())[2]) for agent in agents]
    assert all(isinstance(failure[2], RelayBusy) for failure in failures)
    assert all(7.0 <= delay <= 7.0 * 1.5 for delay in delays), delays
    assert len(set(delays)) == len(delays)


async def test_stop_during_backoff_returns_at_once(nursery: trio.Nursery) -> None:
    config = ClientConfig(backoff_base=30.0, backoff_cap=30.0, backoff_jitter=0.0)
    url = f"ws://127.0.0.1:{closed_port()}/tunnel/connect"
    with trio.fail_after(TEST_TIMEOUT):
        hooks = HookRecorder()
        client = TunnelClient(url, TOKEN, ("127.0.0.1", 9), hooks=hooks.hooks(), config=config)
        done = trio.Event()

        async def run() -> None:
            await client.run()
            done.set()

        nursery.start_soon(run)
        assert await hooks.wait_for("retry_scheduled") == ("retry_scheduled", 1, 30.0)
        client.stop()
        with trio.fail_after(1):  # not the 30 s backoff
            await done.wait()
    assert client.state is ClientState.STOPPED


async def test_stop_is_idempotent(relay: PyRelay, local: LocalServer) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            agent = await start_agent(nursery, relay.url, local.port)
            await agent.hooks.wait_for("session_up")
            agent.client.stop()
            agent.client.stop()
        assert agent.client.state is ClientState.STOPPED
        agent.client.stop()  # after run() returned
    assert agent.client.state is ClientState.STOPPED
    assert agent.hooks.count("dial_attempt") == 1


async def test_stop_while_online_reports_session_down_with_none(
    relay: PyRelay, local: LocalServer
) -> None:
    """As the seed's OnSessionDown: "err may be nil (Stop) or non-nil (connection lost)"."""
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            agent = await start_agent(nursery, relay.url, local.port)
            await agent.hooks.wait_for("session_up")
            agent.client.stop()
    assert agent.hooks.events[-1] == ("session_down", None)


async def test_stop_before_run_makes_run_return_at_once(autojump_clock: object) -> None:
    client = TunnelClient("ws://127.0.0.1:9/tunnel/connect", TOKEN, ("127.0.0.1", 9))
    client.stop()
    start = trio.current_time()
    await client.run()
    assert trio.current_time() == start
    assert client.state is ClientState.STOPPED


async def test_wait_state_takes_the_state_s_value(relay: PyRelay, local: LocalServer) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with TunnelClient(relay.url, TOKEN, ("127.0.0.1", local.port), config=FAST) as client:
            await client.wait_state("online")
            assert client.state == "online"
            with pytest.raises(ValueError):
                await client.wait_state("loud")
            client.stop()


async def test_state_goes_connecting_online_reconnecting_online_stopped(
    relay: PyRelay, local: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="visiona_tunnel.client")
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            client = TunnelClient(relay.url, TOKEN, ("127.0.0.1", local.port), config=FAST)
            assert state_of(client) is ClientState.CONNECTING
            nursery.start_soon(client.run)
            await client.wait_state(ClientState.ONLINE)
            tunnel = await relay.registry.wait_for(DEVICE)
            await tunnel.close(1000, "bye")  # the relay drops it; the agent redials at once
            await client.wait_state(ClientState.RECONNECTING)
            await client.wait_state(ClientState.ONLINE)
            client.stop()
    assert client.state is ClientState.STOPPED
    states = [
        getattr(record, "state", None)
        for record in caplog.records
        if record.name == "visiona_tunnel.client" and record.getMessage() == "state"
    ]
    assert states == ["online", "reconnecting", "online", "stopped"]


async def test_relay_close_code_4001_is_what_replaced_agents_see(
    nursery: trio.Nursery, relay: PyRelay, local: LocalServer
) -> None:
    """A relay that closes with CLOSE_REPLACED (not a newer agent) makes the agent back off
    rather than redial at once."""
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_agent(nursery, relay.url, local.port)
        await agent.hooks.wait_for("session_up")
        tunnel = await relay.registry.wait_for(DEVICE)
        await tunnel.close(CLOSE_REPLACED, "replaced")
        _, error = await agent.hooks.next()
        assert isinstance(error, Replaced)
        assert await agent.hooks.next() == ("retry_scheduled", 1, FAST.backoff_base)
