"""Memory stays bounded whatever the peer sends, and however little it reads.

The peer here floods us with frames that each need an answer (pings, SYNs) and never reads
the answers. We must stop reading its bytes then, rather than queue answers without end.
(The autojump clock skips the write timeout that closing waits out with such a peer.)
"""

from __future__ import annotations

import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from visiona_tunnel.yamux.session import CONTROL_QUEUE_LIMIT, RECEIVE_SIZE

from .helpers import (
    ACK,
    HEADER,
    PING,
    RawPeer,
    Transports,
    controlled,
    is_ping_ack,
    open_raw_pair,
    open_session_pair,
    ping,
    syn,
)

#: The most frames one read from the transport can hold (header-only frames).
FRAMES_PER_READ = RECEIVE_SIZE // HEADER.size
FLOOD = 4 * (CONTROL_QUEUE_LIMIT + FRAMES_PER_READ)


def lockstep_transports() -> Transports:
    """Transports whose ``send_all`` returns only once the other side has read it all."""
    client, server = trio.testing.lockstep_stream_pair()
    return Transports(client, server, networked=False)


async def flood_is_stopped(peer: RawPeer, flood: bytes) -> bool:
    """Send ``flood``; whether our side stopped reading it (the send is still blocked)."""
    finished = False

    async def send() -> None:
        nonlocal finished
        await peer.send(flood)
        finished = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return not finished


async def test_ping_flood_from_a_peer_that_never_reads_stops_our_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transports, _, session_end = controlled(lockstep_transports())
    session_end.block_writes()  # our pongs cannot leave: the peer does not read
    async with open_raw_pair(transports=transports) as (session, peer):
        assert await flood_is_stopped(peer, b"".join(ping(i) for i in range(FLOOD)))
        assert session._conn.queued_control_frames <= CONTROL_QUEUE_LIMIT + FRAMES_PER_READ
        assert not session.is_closed


async def test_syn_flood_beyond_the_backlog_stops_our_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transports, _, session_end = controlled(lockstep_transports())
    session_end.block_writes()
    async with open_raw_pair(transports=transports) as (session, peer):
        # Each SYN is answered by an ACK (into the backlog) or an RST (backlog full).
        assert await flood_is_stopped(peer, b"".join(syn(2 * i + 1) for i in range(FLOOD)))
        assert session._conn.queued_control_frames <= CONTROL_QUEUE_LIMIT + FRAMES_PER_READ
        assert session.num_streams <= session.config.accept_backlog


async def test_reading_resumes_once_the_peer_reads_our_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transports, _, session_end = controlled(lockstep_transports())
    session_end.block_writes()
    async with open_raw_pair(transports=transports) as (session, peer):
        pings = CONTROL_QUEUE_LIMIT + FRAMES_PER_READ + 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.send, b"".join(ping(i) for i in range(pings)))
            await wait_all_tasks_blocked()
            session_end.unblock_writes()
            last = await peer.receive_until(is_ping_ack(pings - 1))
            assert last.type == PING and last.has(ACK)
        assert not session.is_closed


async def test_timers_follow_the_live_streams_not_the_churn() -> None:
    """Each stream opened and closed leaves timer entries; they must not pile up."""
    async with open_session_pair() as (client, server):
        for _ in range(3000):
            stream = await client.open_stream()
            accepted = await server.accept_stream()
            await stream.send_eof()
            await accepted.send_eof()
            assert await accepted.receive_some() == b""
            assert await stream.receive_some() == b""
        assert len(client._timers) <= 2 * client.num_streams + 1024 + 2
        assert len(server._timers) <= 2 * server.num_streams + 1024 + 2
