"""``GET /internal/events``: the remote-proxy's stream of tunnels coming and going, read by
a subscriber over a real socket while our agent (``TunnelClient``) connects, leaves and is
replaced.

Waits are on lines arriving, the agent's hooks, the registry's events and
``ProxyState.event_subscribers.wait_idle``, each bounded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import pytest
import trio
from support.internalapi import (
    DEVICE,
    SECRET,
    TOKEN,
    Proxy,
    ProxyLocalServer,
    call,
    connect_agent,
    json_of,
    start_proxy,
    start_proxy_local_server,
)
from support.proxyevents import EVENTS, Event, subscribe
from support.pyagent import FAST, start_py_agent
from support.tunnellistener import TunnelEvents

from visiona_services.common.envconfig import ConfigError
from visiona_services.remote_proxy.config import ProxyConfig
from visiona_services.remote_proxy.service import RunningProxy, serve_remote_proxy
from visiona_tunnel.client import ClientConfig
from visiona_tunnel.relay import TunnelDown, TunnelUp

#: Upper bound for one test body.
TEST_TIMEOUT = 30.0
#: ISO 8601 UTC with milliseconds.
AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
#: An agent that, once replaced, stays away for the rest of the test.
PATIENT = ClientConfig(backoff_base=60.0, backoff_cap=60.0, connect_timeout=5.0)


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> Proxy:
    return await start_proxy(nursery)


@pytest.fixture
async def local(nursery: trio.Nursery) -> ProxyLocalServer:
    return await start_proxy_local_server(nursery)


def online(events: Iterable[Event]) -> set[str]:
    """The devices online for a subscriber that applies ``events`` in order."""
    devices: set[str] = set()
    for event in events:
        if event["type"] == "snapshot":
            devices = {session["device_id"] for session in event["sessions"]}
        elif event["type"] == "tunnel.up":
            devices.add(event["device_id"])
        elif event["type"] == "tunnel.down":
            devices.discard(event["device_id"])
    return devices


def metric(proxy: Proxy, series: str) -> float:
    return proxy.state.metrics.value(series)


# -- the snapshot and the changes -----------------------------------------------------------


async def test_the_snapshot_lists_the_live_tunnels_as_sessions_does(
    proxy: Proxy, local: ProxyLocalServer, nursery: trio.Nursery
) -> None:
    await connect_agent(nursery, proxy, local.port)
    with trio.fail_after(TEST_TIMEOUT):
        sessions = json_of(await call(proxy.port, "GET", "/internal/sessions"))["data"]
        async with subscribe(proxy.port) as stream:
            snapshot = await stream.next()
    assert snapshot.keys() == {"type", "at", "sessions"}
    assert snapshot["type"] == "snapshot"
    assert AT.fullmatch(snapshot["at"])
    [session] = snapshot["sessions"]
    [listed] = sessions
    assert session.keys() == listed.keys()
    assert (session["device_id"], session["connected"]) == (DEVICE, True)
    assert (session["since"], session["remote_address"]) == (
        listed["since"],
        listed["remote_address"],
    )


async def test_the_snapshot_without_tunnels_is_empty(proxy: Proxy) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscribe(proxy.port) as stream:
            snapshot = await stream.next()
    assert (snapshot["type"], snapshot["sessions"]) == ("snapshot", [])


async def test_an_agent_connecting_then_leaving_gives_up_then_down(
    proxy: Proxy, local: ProxyLocalServer, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscribe(proxy.port) as stream:
            assert (await stream.next())["sessions"] == []
            agent = await connect_agent(nursery, proxy, local.port)
            up = await stream.next_change()
            agent.client.stop()
            down = await stream.next_change()
    assert up.keys() == {"type", "device_id", "at", "session"}
    assert (up["type"], up["device_id"], up["session"]["device_id"]) == (
        "tunnel.up",
        DEVICE,
        DEVICE,
    )
    assert AT.fullmatch(up["at"])
    assert down.keys() == {"type", "device_id", "at", "reason"}
    assert (down["type"], down["device_id"]) == ("tunnel.down", DEVICE)
    assert isinstance(down["reason"], str)
    assert 0 < len(down["reason"]) <= 200
    assert AT.fullmatch(down["at"])
    assert down["at"] >= up["at"]


async def test_a_replaced_tunnel_gives_down_then_up_and_leaves_the_device_online(
    proxy: Proxy, local: ProxyLocalServer, nursery: trio.Nursery
) -> None:
    registry = TunnelEvents()
    proxy.state.tunnels.add_observer(registry)
    with trio.fail_after(TEST_TIMEOUT):
        # The first agent, once replaced, stays away: no flapping between the two.
        await start_py_agent(nursery, proxy.relay_url, TOKEN, local.port, config=PATIENT)
        old = await proxy.state.tunnels.wait_for(DEVICE)
        async with subscribe(proxy.port) as stream:
            assert online([await stream.next()]) == {DEVICE}
            newer = await start_py_agent(nursery, proxy.relay_url, TOKEN, local.port)
            replaced = await stream.next_change()
            up = await stream.next_change()
            ended = await registry.next_down()  # the old tunnel's own end, after that
            # It shows nothing: after the newer agent leaves and a third one comes, the
            # changes are that down and that up.
            newer.client.stop()
            await stream.next_change()
            await start_py_agent(nursery, proxy.relay_url, TOKEN, local.port)
            await stream.next_change()
    # In the registry the newer tunnel came up before the old one ended.
    assert [(type(e), e.tunnel is old) for e in registry.events[:3]] == [
        (TunnelUp, True),
        (TunnelUp, False),
        (TunnelDown, True),
    ]
    assert ended.replaced
    assert (replaced["type"], replaced["device_id"], replaced["reason"]) == (
        "tunnel.down",
        DEVICE,
        "replaced",
    )
    assert (up["type"], up["device_id"]) == ("tunnel.up", DEVICE)
    assert up["at"] == replaced["at"]
    changes = [event for event in stream.events if event["type"] != "heartbeat"]
    assert [(event["type"], event.get("device_id")) for event in changes] == [
        ("snapshot", None),
        ("tunnel.down", DEVICE),
        ("tunnel.up", DEVICE),
        ("tunnel.down", DEVICE),
        ("tunnel.up", DEVICE),
    ]
    assert changes[3]["reason"] != "replaced"
    assert online(changes[:3]) == {DEVICE}


async def test_heartbeats_arrive_while_nothing_changes(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, events_heartbeat=0.05)
    with trio.fail_after(TEST_TIMEOUT):
        async with subscribe(proxy.port) as stream:
            await stream.next()
            beats = [await stream.next() for _ in range(3)]
    assert [beat.keys() for beat in beats] == [{"type", "at"}] * 3
    assert [beat["type"] for beat in beats] == ["heartbeat"] * 3
    assert all(AT.fullmatch(beat["at"]) for beat in beats)


# -- who may subscribe ----------------------------------------------------------------------


@pytest.mark.parametrize("credentials", [[], [("Authorization", "Bearer wrong")]])
async def test_without_the_secret_it_is_401(
    proxy: Proxy, credentials: list[tuple[str, str]]
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", EVENTS, headers=credentials, auth=False)
    assert response.status == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert json_of(response)["error"]["code"] == "UNAUTHORIZED"
    assert proxy.state.event_subscribers.count == 0


async def test_other_methods_are_405(proxy: Proxy) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "POST", EVENTS, b"{}")
    assert response.status == 405
    assert response.headers["allow"] == "GET"
    assert json_of(response)["error"]["code"] == "METHOD_NOT_ALLOWED"


async def test_a_subscriber_arriving_while_draining_gets_503(proxy: Proxy) -> None:
    proxy.state.draining.set()
    with trio.fail_after(TEST_TIMEOUT):
        response = await call(proxy.port, "GET", EVENTS)
    assert response.status == 503
    assert json_of(response)["error"]["code"] == "SHUTTING_DOWN"


# -- subscribers that fall behind or leave --------------------------------------------------

#: A device id this long makes every line over 64 KiB: a subscriber that stops reading
#: fills the socket buffers within a few tunnel changes.
LONG_DEVICE = "d" * 64 * 1024


async def test_a_subscriber_that_falls_behind_is_disconnected_not_buffered(
    nursery: trio.Nursery, local: ProxyLocalServer
) -> None:
    proxy = await start_proxy(nursery, device=LONG_DEVICE)
    proxy.state.events_buffer = 4
    observers = proxy.state.tunnels.observers
    registry = TunnelEvents()
    await connect_agent(nursery, proxy, local.port)
    proxy.state.tunnels.add_observer(registry)
    changes = 0
    with trio.fail_after(TEST_TIMEOUT):
        async with subscribe(proxy.port, receive_buffer=4096) as stream:
            await stream.next()  # the snapshot; from now on this subscriber reads nothing
            while proxy.state.event_subscribers.count:
                tunnel = await proxy.state.tunnels.wait_for(LONG_DEVICE)
                await tunnel.close(1000)  # the agent redials at once
                await registry.next_down()
                changes += 2  # down, then up when the agent is back
                assert changes < 2000, "the subscriber was never dropped"
            # Dropped while it still had not read: nothing more is kept for it.
            assert proxy.state.tunnels.observers == (*observers, registry)
            assert metric(proxy, "visiona_events_subscribers") == 0
            lines = await stream.rest()  # reading again, it finds the end
    assert lines[-1].keys() == {"type", "at"}
    assert lines[-1]["type"] == "overflow"
    received = [line for line in lines[:-1] if line["type"] != "heartbeat"]
    assert len(received) < changes, (len(received), changes)


async def test_a_subscriber_that_leaves_is_unsubscribed_at_once(proxy: Proxy) -> None:
    observers = proxy.state.tunnels.observers
    with trio.fail_after(TEST_TIMEOUT):
        async with subscribe(proxy.port) as stream:
            await stream.next()
            assert len(proxy.state.tunnels.observers) == len(observers) + 1
            assert metric(proxy, "visiona_events_subscribers") == 1
    # Well before the first heartbeat (5 s): the hang-up itself ends the subscription.
    with trio.fail_after(2.0):
        await proxy.state.event_subscribers.wait_idle()
    assert proxy.state.tunnels.observers == observers
    assert metric(proxy, "visiona_events_subscribers") == 0


# -- shutdown and configuration -------------------------------------------------------------


async def test_shutdown_ends_the_stream_and_does_not_delay_stop(
    nursery: trio.Nursery, local: ProxyLocalServer
) -> None:
    config = ProxyConfig(
        tunnel_host="127.0.0.1",
        tunnel_port=0,
        internal_port=0,
        internal_secret=SECRET,
        static_tokens=f"{TOKEN}={DEVICE}",
    )
    returned = trio.Event()

    async def run(*, task_status: trio.TaskStatus[RunningProxy]) -> None:
        await serve_remote_proxy(config, task_status=task_status)
        returned.set()

    running: RunningProxy = await nursery.start(run)
    port = int(running.internal_urls[0].rsplit(":", 1)[1])
    relay = "ws://127.0.0.1:{}/tunnel/connect".format(running.tunnel_urls[0].rsplit(":", 1)[1])
    await start_py_agent(nursery, relay, TOKEN, local.port, config=FAST)
    with trio.fail_after(TEST_TIMEOUT):
        await running.state.tunnels.wait_for(DEVICE)
        async with subscribe(port) as stream:  # a keep-alive connection
            assert online([await stream.next()]) == {DEVICE}
            start = trio.current_time()
            running.stop()
            lines = await stream.rest()
            await returned.wait()
            elapsed = trio.current_time() - start
    assert [line["type"] for line in lines if line["type"] != "heartbeat"] == ["shutdown"]
    assert lines[-1].keys() == {"type", "at"}
    # hypercorn would wait up to its graceful timeout (5 s) for a response still running.
    assert elapsed < 2.0, f"stop took {elapsed:.2f} s with a subscriber"


def test_the_heartbeat_interval_is_configured_and_checked() -> None:
    base = {"VISIONA_INTERNAL_SECRET": SECRET}
    assert ProxyConfig.from_env(base).events_heartbeat == 5.0
    variable = "VISIONA_PROXY_EVENTS_HEARTBEAT"
    assert ProxyConfig.from_env({**base, variable: "0.5"}).events_heartbeat == 0.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ConfigError, match=variable):
            ProxyConfig.from_env({**base, variable: bad})
