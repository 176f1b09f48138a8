"""``InFlight``: the count of running forwards a shutdown waits for."""

from __future__ import annotations

import trio
import trio.testing

from visiona_services.common.inflight import InFlight


async def test_wait_idle_returns_at_once_when_nothing_runs() -> None:
    with trio.testing.assert_checkpoints():
        await InFlight().wait_idle()


async def test_wait_idle_waits_for_the_last_one_to_leave() -> None:
    inflight = InFlight()
    leave = trio.Event()
    woke_with: list[int] = []

    async def operation() -> None:
        with inflight:
            await leave.wait()

    async def shutdown() -> None:
        await inflight.wait_idle()
        woke_with.append(inflight.count)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(operation)
        nursery.start_soon(operation)
        await trio.testing.wait_all_tasks_blocked()
        assert inflight.count == 2
        nursery.start_soon(shutdown)
        await trio.testing.wait_all_tasks_blocked()
        assert woke_with == []
        leave.set()
    assert woke_with == [0]


async def test_count_drops_when_the_block_raises() -> None:
    inflight = InFlight()
    try:
        with inflight:
            raise ValueError
    except ValueError:
        pass
    assert inflight.count == 0
    with trio.fail_after(1):
        await inflight.wait_idle()
