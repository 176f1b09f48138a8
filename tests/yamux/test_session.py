"""The trio session, specified by example.

First the 30 scenarios of hashicorp/yamux's ``session_test.go``, in its order, named after
the Go tests in snake_case. Go's deadlines become cancel scopes, and Go's blocked pipes
become a stalled transport (``ControlledStream``) or a hand-driven peer (``RawPeer``). Then
the wire rules that only a hand-driven peer can show, and how a session ends.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from functools import partial

import attrs
import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from visiona_tunnel.yamux import (
    Config,
    GoAwayError,
    KeepAliveTimeout,
    ProtocolError,
    ProtocolViolation,
    Session,
    SessionClosed,
    SessionTimeout,
    Stream,
    StreamReset,
    open_session,
)

from .helpers import (
    ACK,
    DATA,
    FIN,
    GO_AWAY,
    GO_AWAY_NORMAL,
    GO_AWAY_PROTOCOL_ERROR,
    INITIAL_WINDOW,
    NO_KEEPALIVE,
    PING,
    RST,
    SYN,
    TEST_DEADLINE,
    WINDOW_UPDATE,
    Frame,
    RawPeer,
    Transports,
    controlled,
    data,
    frame,
    is_go_away,
    is_ping_ack,
    memory_transports,
    open_raw_pair,
    open_session_pair,
    pattern,
    ping,
    receive_exactly,
    receive_until_eof,
    still_blocked,
    syn,
    window_update,
)

# hashicorp's testConf(): a small backlog, fast keepalives, a short write timeout. Its
# timeouts suit virtual time; in real time, a busy machine can stall a write for 250 ms.
TEST_CONFIG = Config(accept_backlog=64, keepalive_interval=0.1, connection_write_timeout=0.25)
TEST_CONFIG_NO_KEEPALIVE = attrs.evolve(TEST_CONFIG, enable_keepalive=False)
REAL_TIME_CONFIG = attrs.evolve(TEST_CONFIG, connection_write_timeout=10.0)

#: Over real sockets the mock clock may only jump once I/O has been quiet this long.
NETWORK_AUTOJUMP_THRESHOLD = 0.01


def use_virtual_time(clock: trio.testing.MockClock, transports: Transports) -> None:
    clock.autojump_threshold = NETWORK_AUTOJUMP_THRESHOLD if transports.networked else 0


def is_ping_request(f: Frame) -> bool:
    return f.type == PING and f.has(SYN)


# ---------------------------------------------------------------------------------------
# hashicorp/yamux session_test.go


async def test_ping() -> None:
    """Either side can ping the other and learns the round-trip time."""
    async with open_session_pair(config=REAL_TIME_CONFIG) as (client, server):
        assert await client.ping() > 0
        assert await server.ping() > 0


async def test_ping_timeout(autojump_clock: trio.testing.MockClock) -> None:
    """An unanswered ping waits until the caller gives up; a late answer to it is ignored,
    and the next ping is answered normally."""
    async with open_raw_pair() as (session, raw):
        with trio.move_on_after(1.0) as scope:
            await session.ping()
        assert scope.cancelled_caught
        unanswered = await raw.receive_until(is_ping_request)
        await raw.send(ping(unanswered.length, flags=ACK))

        async def answer_after_two_seconds() -> None:
            request = await raw.receive_until(is_ping_request)
            await trio.sleep(2.0)
            await raw.send(ping(request.length, flags=ACK))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_after_two_seconds)
            assert await session.ping() >= 2.0
        assert not session.is_closed


async def test_close_before_ack(transport_pair: Transports) -> None:
    """Streams closed before the peer's ACK give back their open slot: opening goes on."""
    config = attrs.evolve(REAL_TIME_CONFIG, accept_backlog=8)
    async with open_session_pair(transport_pair, config=config) as (client, server):
        for _ in range(8):
            stream = await client.open_stream()
            await stream.aclose()
        for _ in range(8):
            stream = await server.accept_stream()
            await stream.aclose()

        stream = await client.open_stream()
        await stream.aclose()
        assert (await server.accept_stream()).stream_id == stream.stream_id


async def test_accept() -> None:
    """Each side accepts the other's stream: the client's first id is 1, the server's 2."""
    async with open_session_pair(config=REAL_TIME_CONFIG) as (client, server):
        assert client.num_streams == server.num_streams == 0
        ids: dict[str, int] = {}

        async def get_and_close(name: str, get: Callable[[], Awaitable[Stream]]) -> None:
            stream = await get()
            ids[name] = stream.stream_id
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get_and_close, "server accepts", server.accept_stream)
            nursery.start_soon(get_and_close, "client accepts", client.accept_stream)
            nursery.start_soon(get_and_close, "server opens", server.open_stream)
            nursery.start_soon(get_and_close, "client opens", client.open_stream)

        assert ids == {
            "server accepts": 1,
            "client accepts": 2,
            "server opens": 2,
            "client opens": 1,
        }


async def test_open_stream_timeout(
    transport_pair: Transports, mock_clock: trio.testing.MockClock
) -> None:
    """A stream the peer never ACKs ends the session with SessionTimeout after
    stream_open_timeout."""
    use_virtual_time(mock_clock, transport_pair)
    config = attrs.evolve(NO_KEEPALIVE, stream_open_timeout=0.025)
    async with (
        open_raw_pair(client=True, config=config, transports=transport_pair) as (client, raw),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(raw.discard_frames)
        opened_at = trio.current_time()
        stream = await client.open_stream()

        with pytest.raises(SessionTimeout):
            await stream.receive_some()
        assert trio.current_time() - opened_at >= 0.025
        assert isinstance(client.close_reason, SessionTimeout)
        with pytest.raises(SessionTimeout):
            await stream.send_all(b"x")
        nursery.cancel_scope.cancel()


async def test_close_close_timeout(autojump_clock: trio.testing.MockClock) -> None:
    """A peer that never sends FIN after ours gets RST after stream_close_timeout, and both
    sides forget the stream."""
    config = attrs.evolve(TEST_CONFIG, stream_close_timeout=0.01)
    async with open_session_pair(config=config) as (client, server):
        client_stream = await client.open_stream()
        server_stream = await server.accept_stream()
        await server_stream.send_eof()
        assert await client_stream.receive_some() == b""  # the client never sends its FIN

        await trio.sleep(0.1)

        assert server.num_streams == 0
        assert client.num_streams == 0
        with pytest.raises(StreamReset):
            await client_stream.send_all(b"hello")


async def test_non_nil_interface() -> None:
    """Once the session is closed, accept_stream and open_stream raise SessionClosed."""
    async with open_session_pair(config=REAL_TIME_CONFIG) as (_, server):
        await server.aclose()

        with pytest.raises(SessionClosed):
            await server.accept_stream()
        with pytest.raises(SessionClosed):
            await server.open_stream()


async def test_send_data_small() -> None:
    """A thousand 4-byte writes are read back as a thousand 4-byte messages; once both
    sides have closed, neither session tracks the stream."""
    async with open_session_pair(config=REAL_TIME_CONFIG) as (client, server):

        async def receive() -> None:
            stream = await server.accept_stream()
            assert server.num_streams == 1
            for _ in range(1000):
                assert await receive_exactly(stream, 4) == b"test"
            await stream.aclose()

        async def send() -> None:
            stream = await client.open_stream()
            assert client.num_streams == 1
            for _ in range(1000):
                await stream.send_all(b"test")
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(send)
        await wait_all_tasks_blocked()

        assert client.num_streams == 0
        assert server.num_streams == 0


async def test_send_data_large() -> None:
    """One large write arrives complete and in order through 4 KiB reads."""
    send_size = 64 * 1024 * 1024
    receive_size = 4 * 1024
    payload = pattern(send_size)
    async with open_session_pair(config=REAL_TIME_CONFIG) as (client, server):

        async def receive() -> None:
            stream = await server.accept_stream()
            expected = pattern(receive_size)
            for _ in range(send_size // receive_size):
                assert await receive_exactly(stream, receive_size) == expected
            assert await stream.receive_some() == b""
            await stream.aclose()

        async def send() -> None:
            stream = await client.open_stream()
            await stream.send_all(payload)
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(send)


async def test_go_away() -> None:
    """After the peer's GoAway, open_stream raises GoAwayError(remote=True)."""
    async with open_session_pair(config=REAL_TIME_CONFIG) as (client, server):
        await server.go_away()
        await wait_all_tasks_blocked()

        with pytest.raises(GoAwayError) as raised:
            await client.open_stream()
        assert raised.value.remote


async def test_many_streams() -> None:
    """Fifty streams written concurrently each deliver exactly their own bytes."""
    streams, writes = 50, 1000
    received: list[bytes] = []
    async with open_session_pair(config=REAL_TIME_CONFIG) as (client, server):

        async def receive() -> None:
            stream = await server.accept_stream()
            received.append(await receive_until_eof(stream))
            await stream.aclose()

        async def send(i: int) -> None:
            stream = await client.open_stream()
            message = b"%08d" % i
            for _ in range(writes):
                await stream.send_all(message)
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            for i in range(streams):
                nursery.start_soon(receive)
                nursery.start_soon(send, i)

    assert sorted(received) == [b"%08d" % i * writes for i in range(streams)]


async def test_many_streams_ping_pong() -> None:
    """Fifty streams in lock-step request/response each get every answer, in order."""
    streams, round_trips = 50, 1000
    async with open_session_pair(config=REAL_TIME_CONFIG) as (client, server):

        async def answer() -> None:
            stream = await server.accept_stream()
            while request := await stream.receive_some(4):
                assert request == b"ping"
                await stream.send_all(b"pong")
            await stream.aclose()

        async def ask() -> None:
            stream = await client.open_stream()
            for _ in range(round_trips):
                await stream.send_all(b"ping")
                assert await receive_exactly(stream, 4) == b"pong"
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            for _ in range(streams):
                nursery.start_soon(answer)
                nursery.start_soon(ask)


async def test_half_close(transport_pair: Transports) -> None:
    """A side that has sent FIN still reads what the peer sends, up to the peer's FIN."""
    async with open_session_pair(transport_pair, config=REAL_TIME_CONFIG) as (client, server):
        client_stream = await client.open_stream()
        await client_stream.send_all(b"a")
        server_stream = await server.accept_stream()
        await server_stream.send_eof()

        assert await receive_exactly(server_stream, 1) == b"a"
        await client_stream.send_all(b"bcd")
        await client_stream.send_eof()
        assert await receive_exactly(server_stream, 3) == b"bcd"
        assert await server_stream.receive_some(4) == b""


async def test_half_close_session_shutdown() -> None:
    """Data and FIN that arrived before the peer's session ended are still read in full."""
    async with open_session_pair(config=REAL_TIME_CONFIG) as (client, server):
        stream = await client.open_stream()
        await stream.send_all(pattern(INITIAL_WINDOW))
        server_stream = await server.accept_stream()
        await stream.send_eof()

        await client.aclose()

        assert await receive_exactly(server_stream, INITIAL_WINDOW) == pattern(INITIAL_WINDOW)
        assert await server_stream.receive_some() == b""


async def test_read_deadline(autojump_clock: trio.testing.MockClock) -> None:
    """A receive cancelled by its deadline takes nothing: data sent later arrives intact."""
    async with open_session_pair(config=TEST_CONFIG) as (client, server):
        stream = await client.open_stream()
        server_stream = await server.accept_stream()

        with trio.move_on_after(0.005) as scope:
            await stream.receive_some(4)
        assert scope.cancelled_caught

        await server_stream.send_all(b"data")
        assert await stream.receive_some(4) == b"data"


async def test_read_deadline_blocked_read(autojump_clock: trio.testing.MockClock) -> None:
    """A deadline set while a receive is already blocked cancels it, and loses nothing."""
    async with open_session_pair(config=TEST_CONFIG) as (client, server):
        stream = await client.open_stream()
        server_stream = await server.accept_stream()
        scope = trio.CancelScope()

        async def receive() -> None:
            with scope:
                await stream.receive_some(4)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await wait_all_tasks_blocked()
            scope.deadline = trio.current_time() + 0.005
        assert scope.cancelled_caught

        await server_stream.send_all(b"data")
        assert await stream.receive_some(4) == b"data"


async def check_send_after_cancelled_send(
    sent: bytes, writer: trio.abc.HalfCloseableStream, reader: trio.abc.ReceiveStream
) -> None:
    """After a cancelled send of ``sent``, the stream carries a prefix of it, then more."""

    async def finish() -> None:
        await writer.send_all(b"END")
        await writer.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish)
        received = await receive_until_eof(reader)

    assert received.endswith(b"END")
    assert sent.startswith(received[: -len(b"END")])


async def test_write_deadline(autojump_clock: trio.testing.MockClock) -> None:
    """A send blocked on the window is cancelled by its deadline; the stream stays usable,
    the peer gets a prefix of what was sent and then what is sent next."""
    payload = pattern(2 * INITIAL_WINDOW)
    async with open_session_pair(config=TEST_CONFIG) as (client, server):
        stream = await client.open_stream()
        server_stream = await server.accept_stream()

        with trio.move_on_after(0.05) as scope:
            await stream.send_all(payload)
        assert scope.cancelled_caught

        await check_send_after_cancelled_send(payload, stream, server_stream)


async def test_write_deadline_blocked_write(autojump_clock: trio.testing.MockClock) -> None:
    """A deadline set while a send is already blocked cancels it; the stream stays usable."""
    payload = pattern(2 * INITIAL_WINDOW)
    async with open_session_pair(config=TEST_CONFIG) as (client, server):
        stream = await client.open_stream()
        server_stream = await server.accept_stream()
        scope = trio.CancelScope()

        async def send() -> None:
            with scope:
                await stream.send_all(payload)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await wait_all_tasks_blocked()
            scope.deadline = trio.current_time() + 0.005
        assert scope.cancelled_caught

        await check_send_after_cancelled_send(payload, stream, server_stream)


async def test_backlog_exceeded() -> None:
    """A stream beyond the peer's accept backlog is reset; those within it wait intact."""
    backlog = REAL_TIME_CONFIG.accept_backlog
    async with open_session_pair(config=REAL_TIME_CONFIG) as (client, server):
        for _ in range(backlog):
            stream = await client.open_stream()
            await stream.send_all(b"foo")
        beyond = await client.open_stream()

        with pytest.raises(StreamReset):
            await beyond.receive_some()
        for _ in range(backlog):
            assert await receive_exactly(await server.accept_stream(), 3) == b"foo"
        assert await still_blocked(server.accept_stream)


async def test_keep_alive(transport_pair: Transports, mock_clock: trio.testing.MockClock) -> None:
    """Both sides ping every keepalive_interval and both answer."""
    use_virtual_time(mock_clock, transport_pair)
    transports, client_end, server_end = controlled(transport_pair)
    async with open_session_pair(transports, config=TEST_CONFIG) as (client, server):
        await trio.sleep(2.5 * TEST_CONFIG.keepalive_interval)

        for end in (client_end, server_end):
            assert len([f for f in end.sent_frames if f.type == PING and f.has(SYN)]) >= 2
            assert any(f.type == PING and f.has(ACK) for f in end.sent_frames)
        assert not client.is_closed
        assert not server.is_closed


async def test_keep_alive_timeout(autojump_clock: trio.testing.MockClock) -> None:
    """A peer that sends nothing after our keepalive ping ends the session with
    KeepAliveTimeout, one keepalive timeout after the ping."""
    async with (
        open_raw_pair(config=TEST_CONFIG) as (server, raw),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(raw.discard_frames)
        started = trio.current_time()

        with pytest.raises(KeepAliveTimeout):
            await server.accept_stream()
        elapsed = trio.current_time() - started
        assert isinstance(server.close_reason, KeepAliveTimeout)
        assert server.is_closed
        interval, timeout = TEST_CONFIG.keepalive_interval, TEST_CONFIG.ping_timeout
        assert interval + timeout - 1e-9 <= elapsed <= 2 * interval + timeout
        nursery.cancel_scope.cancel()


async def test_keep_alive_is_satisfied_by_any_inbound_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer that never answers our keepalive pings but keeps sending other frames is
    alive: the session stays open."""
    async with (
        open_raw_pair(config=TEST_CONFIG) as (server, raw),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(raw.discard_frames)
        for i in range(100):
            await raw.send(ping(i))
            await trio.sleep(TEST_CONFIG.keepalive_interval / 2)

        assert not server.is_closed
        assert any(f.type == PING and f.has(SYN) for f in raw.received)
        nursery.cancel_scope.cancel()


async def test_large_window(autojump_clock: trio.testing.MockClock) -> None:
    """With max_stream_window_size doubled, the opener may send that much before any read."""
    config = Config(max_stream_window_size=2 * INITIAL_WINDOW)
    async with open_session_pair(config=config) as (client, server):
        stream = await client.open_stream()
        await server.accept_stream()

        with trio.fail_after(0.01):
            await stream.send_all(bytes(config.max_stream_window_size))


async def test_send_data_very_large() -> None:
    """Sixteen streams each carry a large transfer in full, concurrently."""
    workers, size = 16, 16 * 1024 * 1024
    chunk = bytes(64 * 1024)
    async with open_session_pair(config=REAL_TIME_CONFIG) as (client, server):

        async def receive() -> None:
            stream = await server.accept_stream()
            assert await receive_exactly(stream, 4) == b"\x00\x01\x02\x03"
            assert len(await receive_until_eof(stream)) == size
            await stream.aclose()

        async def send() -> None:
            stream = await client.open_stream()
            await stream.send_all(b"\x00\x01\x02\x03")
            for _ in range(size // len(chunk)):
                await stream.send_all(chunk)
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(receive)
                nursery.start_soon(send)


async def test_backlog_exceeded_accept() -> None:
    """With an acceptor keeping up, five times the backlog of streams get through, none reset."""
    count = 5 * REAL_TIME_CONFIG.accept_backlog
    async with open_session_pair(config=REAL_TIME_CONFIG) as (client, server):

        async def accept_all() -> None:
            for _ in range(count):
                stream = await server.accept_stream()
                assert await receive_exactly(stream, 3) == b"foo"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_all)
            for _ in range(count):
                stream = await client.open_stream()
                await stream.send_all(b"foo")


async def test_session_window_update_write_during_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Reads are not held up by a window update that cannot be written; the stalled write
    ends the session after connection_write_timeout."""
    transports, client_end, _ = controlled(memory_transports())
    config = TEST_CONFIG_NO_KEEPALIVE
    async with open_session_pair(transports, config=config) as (client, server):
        stream = await client.open_stream()
        server_stream = await server.accept_stream()
        client_end.block_writes()
        flood = INITIAL_WINDOW - 1
        await server_stream.send_all(bytes(flood))
        started = trio.current_time()

        assert await receive_exactly(stream, flood) == bytes(flood)
        assert trio.current_time() - started < config.connection_write_timeout
        with pytest.raises(SessionTimeout):
            await stream.receive_some()
        assert trio.current_time() - started >= config.connection_write_timeout


async def test_session_partial_read_window_update(transport_pair: Transports) -> None:
    """Reading part of a full window gives the writer credit for what was read: at least
    half the window, and never for bytes still unread."""
    flood = INITIAL_WINDOW
    config = attrs.evolve(REAL_TIME_CONFIG, enable_keepalive=False)
    async with open_session_pair(transport_pair, config=config) as (client, server):
        stream = await client.open_stream()
        writer = await server.accept_stream()
        await writer.send_all(bytes(flood))
        assert await still_blocked(partial(writer.send_all, b"!"))

        await receive_exactly(stream, flood // 2 + 1)
        await wait_all_tasks_blocked()

        assert not await still_blocked(partial(writer.send_all, bytes(flood // 2)))
        assert await still_blocked(partial(writer.send_all, b"!!"))


async def test_session_send_no_wait_timeout(autojump_clock: trio.testing.MockClock) -> None:
    """Control frames piling up behind a stalled transport end the session with
    SessionTimeout after connection_write_timeout."""
    transports, client_end, _ = controlled(memory_transports())
    config = TEST_CONFIG_NO_KEEPALIVE
    async with open_raw_pair(client=True, config=config, transports=transports) as (client, raw):
        client_end.block_writes()
        started = trio.current_time()
        await raw.send(*(ping(i) for i in range(10_000)))

        with pytest.raises(SessionTimeout):
            await client.accept_stream()
        elapsed = trio.current_time() - started
        assert config.connection_write_timeout <= elapsed < 2 * config.connection_write_timeout


async def test_session_ping_of_death(autojump_clock: trio.testing.MockClock) -> None:
    """A flood of pings while our transport is stalled does not stall our reader; once
    writes resume, pings are answered again."""
    transports, _, server_end = controlled(memory_transports())
    async with open_raw_pair(config=TEST_CONFIG_NO_KEEPALIVE, transports=transports) as (
        server,
        raw,
    ):
        server_end.block_writes()
        await raw.send(*(ping(i) for i in range(10_000)), syn(1), data(1, b"hello"))

        stream = await server.accept_stream()
        assert await receive_exactly(stream, 5) == b"hello"

        server_end.unblock_writes()
        await raw.send(ping(0xDEAD))
        await raw.receive_until(is_ping_ack(0xDEAD))
        assert not server.is_closed


async def test_session_connection_write_timeout(autojump_clock: trio.testing.MockClock) -> None:
    """A transport write stalled longer than connection_write_timeout ends the session with
    SessionTimeout."""
    transports, client_end, _ = controlled(memory_transports())
    config = TEST_CONFIG_NO_KEEPALIVE
    async with open_session_pair(transports, config=config) as (client, server):
        stream = await client.open_stream()
        await server.accept_stream()
        client_end.block_writes()
        started = trio.current_time()

        await stream.send_all(b"hello")
        with pytest.raises(SessionTimeout):
            await stream.receive_some()
        assert trio.current_time() - started >= config.connection_write_timeout
        assert isinstance(client.close_reason, SessionTimeout)
        with pytest.raises(SessionTimeout):
            await stream.send_all(b"hello")


async def test_cancel_accept(autojump_clock: trio.testing.MockClock) -> None:
    """A cancelled accept_stream loses nothing: the next accept gets the next stream."""
    async with open_session_pair(config=TEST_CONFIG) as (client, server):
        scope = trio.CancelScope()

        async def accept() -> None:
            with scope:
                await server.accept_stream()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            await wait_all_tasks_blocked()
            scope.cancel()

        opened = await client.open_stream()
        assert (await server.accept_stream()).stream_id == opened.stream_id


# ---------------------------------------------------------------------------------------
# Cancellation at random points


async def test_cancelled_receive_loses_no_data() -> None:
    """Receives cancelled at random moments never drop or reorder bytes."""
    rng = random.Random(0)
    chunks = [rng.randbytes(rng.randint(1, 3000)) for _ in range(500)]
    async with open_session_pair() as (client, server):
        stream = await client.open_stream()
        server_stream = await server.accept_stream()

        async def send() -> None:
            for chunk in chunks:
                await stream.send_all(chunk)
                await trio.lowlevel.checkpoint()
            await stream.send_eof()

        received = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while True:
                with trio.move_on_after(rng.random() * 1e-4):
                    chunk = await server_stream.receive_some(rng.randint(1, 5000))
                    if not chunk:
                        break
                    received += chunk

    assert received == b"".join(chunks)


async def test_cancelled_accept_loses_no_stream() -> None:
    """accept_stream calls cancelled at random moments never drop a stream."""
    rng = random.Random(0)
    count = 200
    accepted: list[int] = []
    async with open_session_pair() as (client, server):

        async def open_all() -> None:
            for _ in range(count):
                await client.open_stream()
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_all)
            while len(accepted) < count:
                with trio.move_on_after(rng.random() * 1e-4):
                    accepted.append((await server.accept_stream()).stream_id)

    assert accepted == list(range(1, 2 * count, 2))


# ---------------------------------------------------------------------------------------
# Several tasks waiting in the same call


async def test_concurrent_accepts_each_get_a_stream() -> None:
    """Several tasks waiting in accept_stream each get one of the streams that arrive."""
    accepted: list[int] = []
    async with open_session_pair() as (client, server):

        async def accept() -> None:
            accepted.append((await server.accept_stream()).stream_id)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(accept)
            await wait_all_tasks_blocked()
            for _ in range(3):
                await client.open_stream()

    assert sorted(accepted) == [1, 3, 5]


async def test_concurrent_opens_proceed_as_acks_arrive() -> None:
    """Tasks waiting in open_stream for an unACKed slot each open a stream as ACKs arrive."""
    config = attrs.evolve(NO_KEEPALIVE, accept_backlog=1)
    opened: list[int] = []
    async with open_raw_pair(client=True, config=config) as (client, raw):
        await client.open_stream()  # stream 1, unACKed: further opens wait

        async def open_one() -> None:
            opened.append((await client.open_stream()).stream_id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_one)
            nursery.start_soon(open_one)
            await wait_all_tasks_blocked()
            assert opened == []
            for stream_id in (1, 3, 5):
                await raw.send(window_update(stream_id, 0, ACK))
                await wait_all_tasks_blocked()

    assert sorted(opened) == [3, 5]


async def test_session_end_wakes_every_concurrent_waiter() -> None:
    """When the session ends, every task waiting in accept_stream or open_stream wakes with
    SessionClosed, not just the last one to start waiting."""
    config = attrs.evolve(NO_KEEPALIVE, accept_backlog=1)
    woken: list[str] = []
    async with open_raw_pair(client=True, config=config) as (client, _):
        await client.open_stream()  # never ACKed: further opens wait

        async def wait(name: str, call: Callable[[], Awaitable[object]]) -> None:
            with pytest.raises(SessionClosed):
                await call()
            woken.append(name)

        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(wait, f"accept {i}", client.accept_stream)
                nursery.start_soon(wait, f"open {i}", client.open_stream)
            await wait_all_tasks_blocked()
            await client.aclose()

    assert sorted(woken) == ["accept 0", "accept 1", "open 0", "open 1"]


# ---------------------------------------------------------------------------------------
# Streams: ids, half-close, FIN, RST


async def test_client_ids_are_odd_and_server_ids_even() -> None:
    """The client opens 1, 3, 5, ...; the server opens 2, 4, 6, ..."""
    async with open_session_pair() as (client, server):
        client_ids = [(await client.open_stream()).stream_id for _ in range(3)]
        server_ids = [(await server.open_stream()).stream_id for _ in range(3)]

    assert client_ids == [1, 3, 5]
    assert server_ids == [2, 4, 6]


async def test_reads_continue_after_our_fin() -> None:
    """After send_eof we still receive the peer's data, up to its FIN."""
    async with open_session_pair() as (client, server):
        stream = await client.open_stream()
        await stream.send_all(b"request")
        await stream.send_eof()
        server_stream = await server.accept_stream()
        assert await receive_until_eof(server_stream) == b"request"
        await server_stream.send_all(b"response")
        await server_stream.send_eof()

        assert await receive_until_eof(stream) == b"response"


async def test_reset_by_peer_fails_reads_and_writes() -> None:
    """A peer's RST wakes a blocked receive with StreamReset; later reads and writes raise it."""
    async with open_session_pair() as (client, server):
        stream = await client.open_stream()
        server_stream = await server.accept_stream()

        async def receive() -> None:
            with pytest.raises(StreamReset):
                await server_stream.receive_some()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await wait_all_tasks_blocked()
            await stream.reset()

        with pytest.raises(StreamReset):
            await server_stream.receive_some()
        with pytest.raises(StreamReset):
            await server_stream.send_all(b"x")


async def test_reset_drops_buffered_data() -> None:
    """Data buffered before a RST is dropped: the next receive raises StreamReset."""
    async with open_session_pair() as (client, server):
        stream = await client.open_stream()
        await stream.send_all(b"never read")
        server_stream = await server.accept_stream()
        await wait_all_tasks_blocked()

        await stream.reset()
        await wait_all_tasks_blocked()

        with pytest.raises(StreamReset):
            await server_stream.receive_some()


async def test_reset_by_us_fails_our_reads_and_writes() -> None:
    """After our own reset(), the stream's reads and writes raise StreamReset."""
    async with open_session_pair() as (client, _):
        stream = await client.open_stream()
        await stream.reset()

        with pytest.raises(StreamReset):
            await stream.receive_some()
        with pytest.raises(StreamReset):
            await stream.send_all(b"x")


async def test_unread_stream_throttles_writer_at_window() -> None:
    """A reader that does not read stops the writer after one window; reading releases it."""
    async with open_session_pair() as (client, server):
        stream = await client.open_stream()
        await stream.send_all(bytes(INITIAL_WINDOW))
        server_stream = await server.accept_stream()

        assert await still_blocked(partial(stream.send_all, b"!"))
        await receive_exactly(server_stream, INITIAL_WINDOW)
        await wait_all_tasks_blocked()
        assert not await still_blocked(partial(stream.send_all, b"!"))


async def test_go_away_forbids_our_own_new_streams() -> None:
    """After our go_away(), our open_stream raises GoAwayError(remote=False)."""
    async with open_session_pair() as (_, server):
        await server.go_away()

        with pytest.raises(GoAwayError) as raised:
            await server.open_stream()
        assert not raised.value.remote


async def test_go_away_lets_existing_streams_finish() -> None:
    """Streams opened before a GoAway carry data both ways until they close."""
    async with open_session_pair() as (client, server):
        stream = await client.open_stream()
        server_stream = await server.accept_stream()
        await server.go_away()
        await wait_all_tasks_blocked()

        await stream.send_all(b"request")
        await stream.send_eof()
        assert await receive_until_eof(server_stream) == b"request"
        await server_stream.send_all(b"response")
        await server_stream.send_eof()
        assert await receive_until_eof(stream) == b"response"


async def test_accept_loop_ends_quietly_when_session_ends() -> None:
    """``async for stream in session`` yields each stream, then stops without error."""
    accepted: list[int] = []
    async with open_session_pair() as (client, server):
        await client.open_stream()
        await client.open_stream()

        async def accept_loop() -> None:
            async for stream in server:
                accepted.append(stream.stream_id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_loop)
            await wait_all_tasks_blocked()
            await client.aclose()

    assert accepted == [1, 3]


# ---------------------------------------------------------------------------------------
# The wire, seen by a hand-driven peer (the session under test is the server)


async def test_leaving_session_sends_go_away_then_closes_transport() -> None:
    """Closing the session sends GoAway(0) as its last frame, then closes the transport."""
    async with open_raw_pair() as (session, raw):
        await session.aclose()

        frames = await raw.receive_until_eof()
    assert frames[-1] == Frame(0, GO_AWAY, 0, 0, GO_AWAY_NORMAL, b"")


async def test_inbound_stream_is_acked_once_on_arrival() -> None:
    """A SYN is ACKed at once, before accept_stream, and no later frame repeats the ACK."""
    async with open_raw_pair() as (session, raw):
        await raw.send(syn(1))
        ack = await raw.receive_frame()
        assert ack == Frame(0, WINDOW_UPDATE, ACK, 1, 0, b"")

        stream = await session.accept_stream()
        await stream.send_all(b"response")
        await stream.send_eof()
        await raw.send(data(1, b"request", flags=FIN))
        assert await receive_until_eof(stream) == b"request"
        await stream.aclose()
        await session.aclose()
        await raw.receive_until_eof()

    assert [f for f in raw.frames_for(1) if f.has(ACK)] == [ack]


async def test_syn_window_delta_adds_to_initial_window() -> None:
    """The delta on a peer's WindowUpdate|SYN adds to the initial 256 KiB: we may send
    256 KiB + delta before any further credit, and no more."""
    delta = 1000
    async with open_raw_pair() as (session, raw):
        await raw.send(syn(1, delta))
        stream = await session.accept_stream()

        await stream.send_all(pattern(INITIAL_WINDOW + delta))
        assert await still_blocked(partial(stream.send_all, b"!"))

        received = bytearray()
        while len(received) < INITIAL_WINDOW + delta:
            received += (await raw.receive_until(lambda f: f.type == DATA)).body
        assert received == pattern(INITIAL_WINDOW + delta)


@pytest.mark.parametrize("opening", [True, False], ids=["on_syn", "on_ack"])
async def test_large_window_is_announced_as_a_delta(opening: bool) -> None:
    """A larger max_stream_window_size is announced as the delta over 256 KiB on our
    SYN (when we open) or our ACK (when we accept)."""
    config = attrs.evolve(NO_KEEPALIVE, max_stream_window_size=3 * INITIAL_WINDOW)
    async with open_raw_pair(config=config) as (session, raw):
        if opening:
            await session.open_stream()
        else:
            await raw.send(syn(1))
        announcement = await raw.receive_frame()

    assert announcement is not None
    assert announcement.type == WINDOW_UPDATE
    assert announcement.flags == (SYN if opening else ACK)
    assert announcement.length == 2 * INITIAL_WINDOW


async def test_data_frame_may_carry_syn() -> None:
    """A stream may be opened by a Data|SYN frame that carries the first bytes."""
    async with open_raw_pair() as (session, raw):
        await raw.send(data(1, b"hello", flags=SYN))

        stream = await session.accept_stream()
        assert await receive_exactly(stream, 5) == b"hello"


async def test_data_beyond_window_is_a_protocol_error() -> None:
    """Data past the receive window gets GoAway(protocol error) and ends the session with
    ProtocolError."""
    async with open_raw_pair() as (session, raw):
        await raw.send(syn(1), data(1, bytes(INITIAL_WINDOW)), data(1, b"!"))

        go_away = await raw.receive_until(is_go_away)
        assert go_away.length == GO_AWAY_PROTOCOL_ERROR
        await wait_all_tasks_blocked()
        assert isinstance(session.close_reason, ProtocolError)


VIOLATIONS = {
    "duplicate_syn": syn(1) + syn(1),
    "bad_version": frame(PING, SYN, 0, 7, version=1),
    "unknown_type": frame(4, 0, 0, 0),
}


@pytest.mark.parametrize("violation", VIOLATIONS.values(), ids=VIOLATIONS.keys())
async def test_protocol_violation_ends_session_with_go_away(violation: bytes) -> None:
    """A protocol violation gets GoAway(protocol error); the session ends with ProtocolError
    and every later call raises it."""
    async with open_raw_pair() as (session, raw):
        await raw.send(violation)

        go_away = await raw.receive_until(is_go_away)
        assert go_away.length == GO_AWAY_PROTOCOL_ERROR
        await wait_all_tasks_blocked()
        assert isinstance(session.close_reason, ProtocolError)
        with pytest.raises(ProtocolError):
            await session.accept_stream()
        with pytest.raises(ProtocolError):
            await session.open_stream()


async def test_the_accept_loop_raises_what_ended_the_session_uncleanly() -> None:
    """``async for stream in session`` does not end quietly on a protocol violation."""
    async with open_raw_pair() as (session, raw):
        await raw.send(VIOLATIONS["unknown_type"])
        with trio.fail_after(5), pytest.raises(ProtocolError):
            async for _ in session:
                pass
        # The driver's error, made of the core's.
        assert isinstance(session.close_reason, ProtocolError)
        assert isinstance(session.close_reason.__cause__, ProtocolViolation)


async def test_data_for_unknown_stream_is_drained() -> None:
    """Data for a stream that does not exist is skipped whole; the session goes on."""
    body = b"not a header"  # 12 bytes: parsed as a header, it would be version 110
    async with open_raw_pair() as (session, raw):
        await raw.send(data(7, body), ping(42))

        await raw.receive_until(is_ping_ack(42))
        assert not session.is_closed


@pytest.mark.parametrize("flags", [0, ACK, FIN, RST], ids=["plain", "ack", "fin", "rst"])
async def test_window_update_for_unknown_stream_is_ignored(flags: int) -> None:
    """A WindowUpdate for a stream that does not exist gets no answer and no error."""
    async with open_raw_pair() as (session, raw):
        await raw.send(window_update(9, 100, flags), ping(42))

        assert await raw.receive_frame() == Frame(0, PING, ACK, 0, 42, b"")
        assert not session.is_closed


async def test_fin_is_sent_once() -> None:
    """send_eof twice and then aclose put a single FIN on the wire."""
    async with open_raw_pair() as (session, raw):
        await raw.send(syn(1))
        stream = await session.accept_stream()
        await stream.send_eof()
        await stream.send_eof()
        await stream.aclose()
        await raw.send(window_update(1, 0, FIN))
        await session.aclose()
        await raw.receive_until_eof()

    assert len([f for f in raw.frames_for(1) if f.has(FIN)]) == 1


@pytest.mark.parametrize("peer_fin_first", [True, False], ids=["peer_fin_first", "our_fin_first"])
async def test_no_rst_after_complete_exchange(peer_fin_first: bool) -> None:
    """A stream closed by both FINs, in either order, is never reset."""
    async with open_raw_pair() as (session, raw):
        await raw.send(syn(1), data(1, b"request"))
        stream = await session.accept_stream()
        assert await receive_exactly(stream, 7) == b"request"
        if peer_fin_first:
            await raw.send(window_update(1, 0, FIN))
            assert await stream.receive_some() == b""
            await stream.send_all(b"response")
            await stream.aclose()
        else:
            await stream.send_all(b"response")
            await stream.aclose()
            await raw.receive_until(lambda f: f.stream_id == 1 and f.has(FIN))
            await raw.send(window_update(1, 0, FIN))
        await wait_all_tasks_blocked()
        assert session.num_streams == 0
        await session.aclose()
        await raw.receive_until_eof()

    assert not [f for f in raw.frames_for(1) if f.has(RST)]


async def test_data_after_our_aclose_is_answered_with_rst() -> None:
    """Data arriving after our aclose() gets RST, so the peer's writes fail; the session
    goes on."""
    async with open_raw_pair() as (session, raw):
        await raw.send(syn(1))
        stream = await session.accept_stream()
        await stream.aclose()
        await raw.receive_until(lambda f: f.stream_id == 1 and f.has(FIN))

        await raw.send(data(1, b"late"))
        await raw.receive_until(lambda f: f.stream_id == 1 and f.has(RST))
        assert not session.is_closed


@pytest.mark.parametrize(
    "reset",
    [window_update(1, 0, RST), window_update(1, 0, FIN) + window_update(1, 0, RST)],
    ids=["rst", "fin_and_rst_in_one_read"],
)
async def test_peer_rst_fails_blocked_and_later_calls(reset: bytes) -> None:
    """A peer's RST, alone or right behind its FIN, wakes a send blocked on the window with
    StreamReset; later reads and writes raise StreamReset too."""
    async with open_raw_pair() as (session, raw):
        await raw.send(syn(1))
        stream = await session.accept_stream()
        await stream.send_all(bytes(INITIAL_WINDOW))

        async def send_more() -> None:
            with pytest.raises(StreamReset):
                await stream.send_all(b"more")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_more)
            await wait_all_tasks_blocked()
            await raw.send(reset)

        with pytest.raises(StreamReset):
            await stream.receive_some()
        with pytest.raises(StreamReset):
            await stream.send_all(b"x")


async def test_backlog_full_answers_syn_with_rst() -> None:
    """Once accept_backlog streams wait, a further SYN is answered with RST."""
    config = attrs.evolve(NO_KEEPALIVE, accept_backlog=2)
    async with open_raw_pair(config=config) as (session, raw):
        await raw.send(syn(1), syn(3), syn(5))

        answers = [await raw.receive_frame() for _ in range(3)]
        assert [(f.stream_id, f.type, f.flags) for f in answers if f is not None] == [
            (1, WINDOW_UPDATE, ACK),
            (3, WINDOW_UPDATE, ACK),
            (5, WINDOW_UPDATE, RST),
        ]
        assert (await session.accept_stream()).stream_id == 1
        assert (await session.accept_stream()).stream_id == 3
        assert await still_blocked(session.accept_stream)


async def test_go_away_refuses_inbound_streams_with_rst() -> None:
    """After our go_away(), a peer's SYN is answered with RST."""
    async with open_raw_pair() as (session, raw):
        await session.go_away()
        assert (await raw.receive_until(is_go_away)).length == GO_AWAY_NORMAL

        await raw.send(syn(1))
        answer = await raw.receive_until(lambda f: f.stream_id == 1)
        assert answer.has(RST)


async def test_credit_is_returned_on_read_not_on_arrival() -> None:
    """Arriving data earns the peer no credit; reading it all gives back the whole window."""
    async with open_raw_pair() as (session, raw):
        await raw.send(syn(1), *(data(1, bytes(64 * 1024)) for _ in range(4)))
        stream = await session.accept_stream()
        await wait_all_tasks_blocked()
        await raw.send(ping(1))
        await raw.receive_until(is_ping_ack(1))
        assert [f.length for f in raw.frames_for(1) if f.type == WINDOW_UPDATE] == [0]

        await receive_exactly(stream, INITIAL_WINDOW)
        credit = 0
        while credit < INITIAL_WINDOW:
            update = await raw.receive_until(lambda f: f.type == WINDOW_UPDATE)
            credit += update.length
        assert credit == INITIAL_WINDOW


# ---------------------------------------------------------------------------------------
# Ending a session wakes every waiter


async def start_waiting(session: Session, waiter: str) -> Callable[[], Awaitable[object]]:
    """Set up ``waiter`` on a session whose raw peer never answers; returns the call."""
    if waiter == "receive_some":
        return (await session.open_stream()).receive_some
    if waiter == "send_all":
        return partial((await session.open_stream()).send_all, bytes(INITIAL_WINDOW + 1))
    if waiter == "open_stream":
        await session.open_stream()  # never ACKed: the open backlog of one is full
        return session.open_stream
    if waiter == "accept_stream":
        return session.accept_stream
    assert waiter == "ping"
    return session.ping


@pytest.mark.parametrize(
    "ending", ["peer_eof", "protocol_error", "local_aclose", "owner_cancelled"]
)
@pytest.mark.parametrize(
    "waiter", ["receive_some", "send_all", "accept_stream", "open_stream", "ping"]
)
async def test_session_end_wakes_waiter(waiter: str, ending: str) -> None:
    """However the session ends, a task waiting on it wakes with SessionClosed (ProtocolError
    after a protocol violation), and so does any later call."""
    expected = ProtocolError if ending == "protocol_error" else SessionClosed
    config = attrs.evolve(NO_KEEPALIVE, accept_backlog=1)
    transports = memory_transports()
    raw = RawPeer(transports.server)
    outcome: list[BaseException | None] = []
    woken = trio.Event()

    async def wait(call: Callable[[], Awaitable[object]]) -> None:
        try:
            await call()
        except Exception as exc:
            outcome.append(exc)
        else:
            outcome.append(None)
        woken.set()

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as outside:
            outside.start_soon(raw.discard_frames)
            with trio.CancelScope() as owner:
                async with open_session(transports.client, client=True, config=config) as session:
                    call = await start_waiting(session, waiter)
                    outside.start_soon(wait, call)
                    await wait_all_tasks_blocked()
                    assert not woken.is_set()

                    if ending == "peer_eof":
                        await raw.transport.aclose()
                    elif ending == "protocol_error":
                        await raw.send(frame(PING, SYN, 0, 1, version=1))
                    elif ending == "local_aclose":
                        await session.aclose()
                    else:
                        owner.cancel()
                    await woken.wait()
            await woken.wait()
            outside.cancel_scope.cancel()

        assert isinstance(outcome[0], expected), outcome
        assert isinstance(session.close_reason, expected)
        with pytest.raises(expected):
            await call()
