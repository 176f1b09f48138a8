"""Openers blocked on the unACKed-stream limit proceed as soon as a slot frees, however it frees."""

from __future__ import annotations

import attrs
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from .helpers import (
    NO_KEEPALIVE,
    RST,
    SYN,
    open_raw_pair,
    window_update,
)


async def test_open_waiter_woken_when_abandoned_unacked_stream_is_reset() -> None:
    """A task waiting in open_stream for an unACKed slot must proceed once the peer RSTs
    the unACKed stream, even if the application had already closed that stream."""
    config = attrs.evolve(NO_KEEPALIVE, accept_backlog=1)
    opened: list[int] = []
    async with open_raw_pair(client=True, config=config) as (client, raw):
        first = await client.open_stream()  # stream 1, unACKed: further opens wait
        await raw.receive_until(lambda f: f.stream_id == 1 and f.has(SYN))

        async def open_one() -> None:
            opened.append((await client.open_stream()).stream_id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_one)
            await wait_all_tasks_blocked()
            assert opened == []
            await first.aclose()  # e.g. the request that wanted it was cancelled
            # The peer refuses stream 1 (backlog full / GoAway), as hashicorp does.
            await raw.send(window_update(1, 0, RST))
            await wait_all_tasks_blocked()
            free_slots = config.accept_backlog - client._conn.unacked_streams
            nursery.cancel_scope.cancel()

    # Fails today with opened == [] and free_slots == 1: the slot is free, but the waiting
    # opener was never woken (no ResetReceived for an abandoned stream).
    assert opened == [3], f"opener still waiting with {free_slots} free slot(s)"


async def test_open_waiter_woken_when_close_timeout_frees_an_unacked_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Same hang through the close timer: the RST it sends frees the unACKed slot, but the
    task waiting in open_stream is not woken."""
    config = attrs.evolve(
        NO_KEEPALIVE, accept_backlog=1, stream_open_timeout=None, stream_close_timeout=1.0
    )
    opened: list[int] = []
    done = trio.Event()
    async with open_raw_pair(client=True, config=config) as (client, raw):
        first = await client.open_stream()
        await first.send_eof()  # the peer never ACKs nor FINs: the close timer will RST it

        async def open_one() -> None:
            opened.append((await client.open_stream()).stream_id)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw.discard_frames)
            nursery.start_soon(open_one)
            with trio.move_on_after(10):  # virtual time: the close timer fires after 1 s
                await done.wait()
            free_slots = config.accept_backlog - client._conn.unacked_streams
            nursery.cancel_scope.cancel()

    assert opened == [3], f"opener still waiting with {free_slots} free slot(s)"
