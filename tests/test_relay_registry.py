"""``TunnelRegistry``'s observers: added, removed (also while an event is being handed
out), over a real tunnel from our agent to our relay on loopback."""

from __future__ import annotations

import trio
from support.pyagent import start_py_agent
from support.pyrelay import start_py_relay
from support.tunnelhttp import LocalServer

from visiona_tunnel.relay import TunnelDown, TunnelEvent, TunnelRegistry, TunnelUp

#: Upper bound for one test body.
TEST_TIMEOUT = 20.0


async def test_a_removed_observer_gets_nothing_more_and_the_others_go_on(
    nursery: trio.Nursery, local: LocalServer
) -> None:
    relay = await start_py_relay(nursery, {"token": "device"})
    registry = relay.registry
    first: list[TunnelEvent] = []
    leaving: list[TunnelEvent] = []
    last: list[TunnelEvent] = []
    ended = trio.Event()

    def leave_at_once(event: TunnelEvent) -> None:
        leaving.append(event)
        registry.remove_observer(leave_at_once)  # while the registry hands the event out

    def watch_the_end(event: TunnelEvent) -> None:
        if isinstance(event, TunnelDown):
            ended.set()

    for observer in (first.append, leave_at_once, last.append, watch_the_end):
        registry.add_observer(observer)
    with trio.fail_after(TEST_TIMEOUT):
        agent = await start_py_agent(nursery, relay.url, "token", local.port)
        await registry.wait_for("device")
        agent.client.stop()
        await ended.wait()
    assert [type(event) for event in leaving] == [TunnelUp]
    assert [type(event) for event in first] == [TunnelUp, TunnelDown]
    assert [type(event) for event in last] == [TunnelUp, TunnelDown]  # not skipped
    assert registry.observers == (first.append, last.append, watch_the_end)


def test_removing_an_observer_twice_or_one_never_added_does_nothing() -> None:
    registry = TunnelRegistry()
    seen: list[TunnelEvent] = []
    registry.add_observer(seen.append)
    registry.remove_observer(seen.append)
    registry.remove_observer(seen.append)
    registry.remove_observer(print)
    assert registry.observers == ()
