"""``Stream.receive_at_least``: small frames gathered into one read, without waiting for
what cannot come and without losing bytes to a cancellation."""

from __future__ import annotations

import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from visiona_tunnel.yamux import Stream

from .helpers import FIN, INITIAL_WINDOW, data, open_raw_pair, syn

KiB = 1024


def start_reading(nursery: trio.Nursery, stream: Stream, size: int, patience: float) -> list[bytes]:
    """``stream.receive_at_least(size, size, patience)`` in a task; its answer lands in
    the list returned."""
    reads: list[bytes] = []

    async def read() -> None:
        reads.append(await stream.receive_at_least(size, size, patience=patience))

    nursery.start_soon(read)
    return reads


async def test_small_frames_on_their_way_become_one_read_once_it_is_full() -> None:
    async with open_raw_pair() as (session, raw):
        await raw.send(syn(1), data(1, b"a" * (4 * KiB)))
        stream = await session.accept_stream()
        async with trio.open_nursery() as nursery:
            reads = start_reading(nursery, stream, 64 * KiB, patience=60)
            for _ in range(15):
                await wait_all_tasks_blocked()
                assert not reads  # still gathering
                await raw.send(data(1, b"b" * (4 * KiB)))
        assert reads == [b"a" * (4 * KiB) + b"b" * (60 * KiB)]


async def test_the_wait_ends_after_the_patience_with_what_is_there(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_raw_pair() as (session, raw):
        await raw.send(syn(1), data(1, b"x" * 100))
        stream = await session.accept_stream()
        start = trio.current_time()
        assert await stream.receive_at_least(64 * KiB, 64 * KiB, patience=0.5) == b"x" * 100
        assert trio.current_time() - start == 0.5


async def test_no_wait_for_more_than_the_peers_credit_lets_it_send(
    mock_clock: trio.testing.MockClock,
) -> None:
    # A read larger than the window: once the peer has sent its whole window, nothing
    # more can come before we read, and the read returns at once.
    async with open_raw_pair() as (session, raw):
        await raw.send(syn(1), data(1, b"a" * 100))
        stream = await session.accept_stream()
        async with trio.open_nursery() as nursery:
            reads = start_reading(nursery, stream, 1024 * KiB, patience=1)
            await wait_all_tasks_blocked()
            await raw.send(data(1, b"b" * (INITIAL_WINDOW - 200)))
            await wait_all_tasks_blocked()
            assert not reads  # 100 bytes of credit left
            await raw.send(data(1, b"c" * 100))
            await wait_all_tasks_blocked()
            returned_at_once = bool(reads)
            mock_clock.jump(1)  # lets a read that waits on (wrongly) end
        assert returned_at_once
        assert reads == [b"a" * 100 + b"b" * (INITIAL_WINDOW - 200) + b"c" * 100]


async def test_the_peers_fin_ends_the_wait_and_the_next_read_sees_it(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with open_raw_pair() as (session, raw):
        await raw.send(syn(1), data(1, b"x" * 100))
        stream = await session.accept_stream()
        async with trio.open_nursery() as nursery:
            reads = start_reading(nursery, stream, 64 * KiB, patience=60)
            await wait_all_tasks_blocked()
            await raw.send(data(1, b"yz", FIN))
        assert reads == [b"x" * 100 + b"yz"]
        assert await stream.receive_some() == b""


async def test_a_cancel_during_the_wait_loses_no_bytes(mock_clock: trio.testing.MockClock) -> None:
    async with open_raw_pair() as (session, raw):
        await raw.send(syn(1), data(1, b"x" * 100))
        stream = await session.accept_stream()
        reads: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def read(scope: trio.CancelScope) -> None:
                with scope:
                    reads.append(await stream.receive_at_least(64 * KiB, 64 * KiB, patience=1))
                    await trio.sleep_forever()

            scope = trio.CancelScope()
            nursery.start_soon(read, scope)
            await wait_all_tasks_blocked()
            scope.cancel()
            await wait_all_tasks_blocked()
            assert not reads  # the wait is shielded, up to its patience
            mock_clock.jump(1)
        assert reads == [b"x" * 100]
