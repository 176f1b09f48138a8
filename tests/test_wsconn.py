"""A WebSocket as a byte stream: trio's stream contract, message boundaries, closing."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import unittest.mock
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trio_websocket
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.events import Request as WsRequest

from visiona_tunnel.trio_websocket_stream import TrioWebSocketStream
from visiona_tunnel.wsconn import (
    CLOSE_REPLACED,
    WebSocketClosed,
    WebSocketRejected,
    WebSocketStream,
    accept_websocket_stream,
    client_handshake,
    connect_websocket_stream,
    encode_binary_message,
    receive_websocket_request,
)

Pair = tuple[WebSocketStream, WebSocketStream]


async def memory_pair() -> Pair:
    """A connected (client, server) pair over in-memory transports."""
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        box: list[WebSocketStream] = []

        async def accept() -> None:
            box.append(await accept_websocket_stream(server_end))

        nursery.start_soon(accept)
        client = await client_handshake(client_end, "example", "/tunnel/connect")
    return client, box[0]


@asynccontextmanager
async def tcp_server(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


class PeerOf:
    """The far end of a client WebSocketStream, driven with wsproto by hand."""

    def __init__(self, transport: trio.abc.Stream, connection: Connection) -> None:
        self.transport = transport
        self.ws = connection

    async def send(self, *events: BytesMessage | TextMessage | Ping | CloseConnection) -> None:
        await self.transport.send_all(b"".join(self.ws.send(event) for event in events))

    async def events(self) -> list[object]:
        self.ws.receive_data(bytes(await self.transport.receive_some()))
        return list(self.ws.events())


async def client_and_raw_server() -> tuple[WebSocketStream, PeerOf]:
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        box: list[PeerOf] = []

        async def accept() -> None:
            request = await receive_websocket_request(server_end)
            await request.accept()
            assert request._ws.connection is not None
            box.append(PeerOf(server_end, request._ws.connection))

        nursery.start_soon(accept)
        client = await client_handshake(client_end, "example", "/")
    return client, box[0]


# -- the trio stream contract -------------------------------------------------------------


async def test_a_websocket_stream_pair_is_a_trio_two_way_stream_over_memory() -> None:
    await trio.testing.check_two_way_stream(memory_pair, None)


async def test_a_websocket_stream_pair_is_a_trio_two_way_stream_over_tcp() -> None:
    async with trio.open_nursery() as nursery:
        accepted: trio.MemorySendChannel[WebSocketStream]
        accepted, incoming = trio.open_memory_channel[WebSocketStream](1)

        async def handler(tcp: trio.SocketStream) -> None:
            await accepted.send(await accept_websocket_stream(tcp))
            await trio.sleep_forever()

        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]

        async def tcp_pair() -> Pair:
            client = await connect_websocket_stream(f"ws://127.0.0.1:{port}/x")
            return client, await incoming.receive()

        await trio.testing.check_two_way_stream(tcp_pair, None)
        nursery.cancel_scope.cancel()


# -- message boundaries -------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    messages=st.lists(st.binary(min_size=0, max_size=3000), max_size=12), read=st.integers(1, 5000)
)
async def test_bytes_arrive_in_order_whatever_the_message_boundaries(
    messages: list[bytes], read: int
) -> None:
    client, server = await memory_pair()
    for message in messages:
        await client.send_all(message)
    expected = b"".join(messages)
    received = bytearray()
    while len(received) < len(expected):
        chunk = await server.receive_some(read)
        assert 0 < len(chunk) <= read
        received += chunk
    assert received == expected


async def test_a_fragmented_message_reads_as_its_bytes() -> None:
    """gorilla splits large messages into a first frame and continuation frames."""
    client, peer = await client_and_raw_server()
    await peer.send(
        BytesMessage(data=b"abc", message_finished=False),
        BytesMessage(data=b"def", message_finished=False),
        BytesMessage(data=b"ghi", message_finished=True),
    )
    received = b""
    while len(received) < 9:
        received += await client.receive_some()
    assert received == b"abcdefghi"


async def test_header_and_body_in_two_messages_read_as_one_byte_stream() -> None:
    """A Go yamux peer writes a frame's 12-byte header and its body as two messages."""
    client, peer = await client_and_raw_server()
    await peer.send(BytesMessage(data=b"H" * 12), BytesMessage(data=b"B" * 100))
    received = b""
    while len(received) < 112:
        received += await client.receive_some(112)
    assert received == b"H" * 12 + b"B" * 100


async def test_messages_that_arrived_together_are_read_in_one_piece() -> None:
    """gorilla's 4 KiB frames: the yamux reader takes a socket read's worth at once, not
    one small message at a time."""
    client, peer = await client_and_raw_server()
    await peer.send(*(BytesMessage(data=bytes([n]) * 4096) for n in range(16)))
    assert await client.receive_some(256 * 1024) == b"".join(bytes([n]) * 4096 for n in range(16))


async def test_empty_messages_are_not_end_of_file() -> None:
    client, peer = await client_and_raw_server()
    await peer.send(BytesMessage(data=b""), BytesMessage(data=b"x"))
    assert await client.receive_some() == b"x"


# -- limits and errors --------------------------------------------------------------------


async def test_default_message_limit_takes_a_16_mib_yamux_frame() -> None:
    client, server = await memory_pair()
    frame = os.urandom(16 * 1024 * 1024 + 12)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, frame)
        received = bytearray()
        while len(received) < len(frame):
            received += await server.receive_some()
    assert received == frame


async def test_a_message_over_the_limit_closes_with_1009() -> None:
    client, peer = await client_and_raw_server()
    client.max_message_size = 1000
    await peer.send(BytesMessage(data=b"x" * 600, message_finished=False))
    await peer.send(BytesMessage(data=b"x" * 600, message_finished=True))
    with pytest.raises(WebSocketClosed) as raised:
        while True:
            await client.receive_some()
    assert raised.value.code == 1009
    assert any(isinstance(e, CloseConnection) and e.code == 1009 for e in await peer.events())


async def test_a_text_message_is_a_protocol_error_closing_with_1003() -> None:
    client, peer = await client_and_raw_server()
    await peer.send(TextMessage(data="hello"))
    with pytest.raises(WebSocketClosed) as raised:
        await client.receive_some()
    assert raised.value.code == 1003


@pytest.mark.parametrize("code", [1000, 1001])
async def test_normal_and_going_away_closes_read_as_end_of_file(code: int) -> None:
    client, peer = await client_and_raw_server()
    await peer.send(BytesMessage(data=b"last"), CloseConnection(code=code))
    assert await client.receive_some() == b"last"
    assert await client.receive_some() == b""
    assert client.close_code == code


async def test_other_close_codes_raise_with_the_code() -> None:
    client, peer = await client_and_raw_server()
    await peer.send(CloseConnection(code=CLOSE_REPLACED, reason="replaced"))
    with pytest.raises(WebSocketClosed) as raised:
        await client.receive_some()
    assert (raised.value.code, raised.value.reason) == (CLOSE_REPLACED, "replaced")
    assert isinstance(raised.value, trio.BrokenResourceError)
    assert client.close_code == CLOSE_REPLACED


async def test_a_close_is_answered_with_a_close() -> None:
    client, peer = await client_and_raw_server()
    await peer.send(CloseConnection(code=1000))
    assert await client.receive_some() == b""
    assert any(isinstance(e, CloseConnection) for e in await peer.events())


async def test_a_ping_is_answered_with_a_pong() -> None:
    client, peer = await client_and_raw_server()
    await peer.send(Ping(payload=b"are you there"), BytesMessage(data=b"x"))
    assert await client.receive_some() == b"x"
    events = await peer.events()
    assert Pong(payload=b"are you there") in events


async def test_a_lost_connection_raises_1006() -> None:
    client, peer = await client_and_raw_server()
    await peer.transport.aclose()
    with pytest.raises(WebSocketClosed) as raised:
        await client.receive_some()
    assert raised.value.code == 1006


async def test_our_close_sends_a_close_frame_and_later_use_is_closed_resource() -> None:
    client, peer = await client_and_raw_server()
    await client.aclose()
    assert any(isinstance(e, CloseConnection) and e.code == 1000 for e in await peer.events())
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")


async def test_our_close_during_a_write_follows_the_write() -> None:
    """A close while a message is going out (a yamux GoAway just before, say) waits for it:
    the peer gets the whole message, then our code -- not a lost connection (1006)."""
    client_end, server_end = trio.testing.lockstep_stream_pair()
    box: list[WebSocketStream] = []
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            box.append(await accept_websocket_stream(server_end))

        nursery.start_soon(accept)
        client = await client_handshake(client_end, "example", "/tunnel/connect")
    server = box[0]
    payload = bytes(range(256)) * 400
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, payload)
        await wait_all_tasks_blocked()  # the write waits for the peer to read
        nursery.start_soon(functools.partial(client.aclose, CLOSE_REPLACED, "replaced"))
        await wait_all_tasks_blocked()
        with pytest.raises(WebSocketClosed) as raised:
            while data := await server.receive_some():
                received += data
    assert bytes(received) == payload
    assert raised.value.code == CLOSE_REPLACED


# -- the handshake ------------------------------------------------------------------------


async def test_a_refused_upgrade_raises_with_the_status() -> None:
    async def refuse(tcp: trio.SocketStream) -> None:
        request = await receive_websocket_request(tcp)
        await request.reject(401, b"unauthorized\n")

    async with tcp_server(refuse) as port:
        with pytest.raises(WebSocketRejected) as raised:
            await connect_websocket_stream(f"ws://127.0.0.1:{port}/tunnel/connect?token=bad")
    assert raised.value.status_code == 401
    assert raised.value.body == b"unauthorized\n"


@pytest.mark.parametrize(
    "answer",
    [b"", b"not http at all\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"],
    ids=["closed", "garbage", "cut-short"],
)
async def test_an_answer_that_is_not_a_handshake_is_a_broken_dial(answer: bytes) -> None:
    async def answer_badly(tcp: trio.SocketStream) -> None:
        await tcp.receive_some()
        await tcp.send_all(answer)
        await tcp.aclose()

    async with tcp_server(answer_badly) as port:
        with pytest.raises(trio.BrokenResourceError):
            await connect_websocket_stream(f"ws://127.0.0.1:{port}/tunnel/connect")


async def test_the_request_target_and_headers_reach_the_server() -> None:
    seen: list[tuple[str, list[tuple[bytes, bytes]]]] = []

    async def record(tcp: trio.SocketStream) -> None:
        request = await receive_websocket_request(tcp)
        seen.append((request.target, request.headers))
        ws = await request.accept()
        await ws.send_all(b"hi")

    async with tcp_server(record) as port:
        url = f"ws://127.0.0.1:{port}/tunnel/connect?token=a%20b"
        client = await connect_websocket_stream(url, headers=[("X-Agent", "7")])
        assert await client.receive_some() == b"hi"
        await client.aclose()
    assert seen[0][0] == "/tunnel/connect?token=a%20b"
    assert (b"x-agent", b"7") in [(k.lower(), v) for k, v in seen[0][1]]


# -- the data path matches wsproto --------------------------------------------------------


@given(payload=st.binary(max_size=70_000), key=st.binary(min_size=4, max_size=4))
def test_our_binary_frames_are_the_bytes_wsproto_would_send(payload: bytes, key: bytes) -> None:
    for client in (True, False):
        connection = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
        with unittest.mock.patch("os.urandom", return_value=key):
            expected = connection.send(BytesMessage(data=payload))
        ours = encode_binary_message(payload, client=client, masking_key=key)
        assert b"".join(ours) == bytes(expected)


@given(
    parts=st.lists(st.binary(max_size=300), max_size=8),
    key=st.binary(min_size=4, max_size=4),
    client=st.booleans(),
)
def test_a_message_of_several_buffers_is_the_bytes_wsproto_would_send_for_them_joined(
    parts: list[bytes], key: bytes, client: bool
) -> None:
    connection = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
    with unittest.mock.patch("os.urandom", return_value=key):
        expected = connection.send(BytesMessage(data=b"".join(parts)))
    ours = encode_binary_message(list(parts), client=client, masking_key=key)
    assert b"".join(ours) == bytes(expected)


def test_importing_the_library_has_no_side_effects() -> None:
    check = (
        "import sys, wsproto.frame_protocol as f; original = f.XorMaskerSimple; "
        "import visiona_tunnel, visiona_tunnel.yamux; "
        "assert f.XorMaskerSimple is original; "
        "services = {'trio_websocket', 'hypercorn', 'quart', 'quart_trio', 'cattrs'}; "
        "assert not services & set(sys.modules), services & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)


# -- control frames owed while a write is in progress ---------------------------------------


class Gated(trio.abc.Stream):
    """Wraps a transport; writes wait while the gate is closed."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.gate = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.gate.wait()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _while_a_write_is_held(batches: list[bytes]) -> list[object]:
    """The peer sends each of ``batches`` while our send_all is in the middle of a write
    (our reader reading them as they come); the write then completes. Returns every event
    the peer receives."""
    client, peer = await client_and_raw_server()
    gated = Gated(client.transport)
    client.transport = gated
    received: list[object] = []

    async def peer_reader() -> None:
        while data := await peer.transport.receive_some():
            peer.ws.receive_data(bytes(data))
            received.extend(peer.ws.events())

    async def client_reader() -> None:
        while await client.receive_some():
            pass

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer_reader)
            nursery.start_soon(client.send_all, b"payload")  # held in the transport
            await wait_all_tasks_blocked()
            for number, batch in enumerate(batches):
                await peer.transport.send_all(batch)
                if not number:
                    nursery.start_soon(client_reader)  # reads while the write is busy
                await wait_all_tasks_blocked()
            gated.gate.set()  # the write completes
            await wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert any(isinstance(e, BytesMessage) for e in received)  # the write did complete
    return received


async def _control_owed_during_a_write(event: Ping | CloseConnection) -> list[object]:
    """The peer sends ``event`` while our send_all is in the middle of a write."""
    peer_ws = Connection(ConnectionType.SERVER)
    return await _while_a_write_is_held([peer_ws.send(event)])


async def test_a_ping_received_during_a_write_is_answered() -> None:
    received = await _control_owed_during_a_write(Ping(payload=b"are you there"))
    assert Pong(payload=b"are you there") in received, received


async def test_a_close_received_during_a_write_is_answered() -> None:
    received = await _control_owed_during_a_write(CloseConnection(code=1000))
    assert any(isinstance(e, CloseConnection) for e in received), received


async def test_a_ping_flood_during_a_held_write_owes_one_pong_the_latest() -> None:
    # An attacker stops reading (our write is held) and floods pings: every pong queued
    # would grow our memory without bound; the latest one is all RFC 6455 asks for.
    peer_ws = Connection(ConnectionType.SERVER)
    batches = [
        b"".join(peer_ws.send(Ping(payload=b"%d-%d" % (batch, n))) for n in range(500))
        for batch in range(20)
    ]
    received = await _while_a_write_is_held(batches)
    pongs = [event for event in received if isinstance(event, Pong)]
    assert pongs == [Pong(payload=b"19-499")]


async def test_a_thousand_pings_in_one_read_are_answered_over_tcp() -> None:
    # Each owed frame was a buffer of its own in one sendmsg: past IOV_MAX (1024) the
    # kernel refused it (EMSGSIZE) and the connection died.
    async with trio.open_nursery() as nursery:
        accepted, incoming = trio.open_memory_channel[WebSocketStream](1)

        async def handler(tcp: trio.SocketStream) -> None:
            await accepted.send(await accept_websocket_stream(tcp))
            await trio.sleep_forever()

        async with tcp_server(handler) as port:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            peer_ws = WSConnection(ConnectionType.CLIENT)
            await tcp.send_all(peer_ws.send(WsRequest(host="example", target="/")))
            server = await incoming.receive()
            nursery.start_soon(server.receive_some)
            with trio.fail_after(5):
                events: list[object] = []
                while not any(isinstance(e, AcceptConnection) for e in events):
                    peer_ws.receive_data(await tcp.receive_some())
                    events.extend(peer_ws.events())
                await tcp.send_all(b"".join(peer_ws.send(Ping(b"%d" % n)) for n in range(1030)))
                pongs: list[Pong] = []
                while not pongs:
                    peer_ws.receive_data(await tcp.receive_some())
                    pongs = [e for e in peer_ws.events() if isinstance(e, Pong)]
            assert pongs == [Pong(payload=b"1029")]
            await server.send_all(b"still up")
            with trio.fail_after(5):
                message = b""
                while not message:
                    peer_ws.receive_data(await tcp.receive_some())
                    message = b"".join(
                        bytes(e.data) for e in peer_ws.events() if isinstance(e, BytesMessage)
                    )
            assert message == b"still up"
            nursery.cancel_scope.cancel()  # the server's reader, before the peer hangs up
            await tcp.aclose()


# -- TrioWebSocketStream (a byte stream over a trio-websocket connection) -----------------


@asynccontextmanager
async def trio_websocket_pair() -> AsyncIterator[
    tuple[trio_websocket.WebSocketConnection, trio_websocket.WebSocketConnection]
]:
    """(client, server) trio-websocket connections over loopback TCP, closed at the end."""
    accepted, incoming = trio.open_memory_channel[trio_websocket.WebSocketConnection](1)

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        await accepted.send(await request.accept())
        await trio.sleep_forever()  # the connection lives as long as its handler

    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            trio_websocket.serve_websocket, handler, "127.0.0.1", 0, ssl_context=None
        )
        server: trio_websocket.WebSocketServer = await nursery.start(serve)
        # Our own TCP stream: trio-websocket's client leaves its socket open when the
        # server closes with 1003.
        async with await trio.open_tcp_stream("127.0.0.1", server.port) as tcp:
            client = await trio_websocket.wrap_client_stream(nursery, tcp, "127.0.0.1", "/")
            yield client, await incoming.receive()
            await client.aclose()
        nursery.cancel_scope.cancel()


async def test_trio_websocket_stream_reads_messages_as_bytes_in_order() -> None:
    async with trio_websocket_pair() as (client, server):
        stream = TrioWebSocketStream(server)
        for message in (b"abc", b"", b"defgh"):
            await client.send_message(message)
        received = b""
        while len(received) < 8:
            received += await stream.receive_some(2)
        assert received == b"abcdefgh"
        with pytest.raises(ValueError):
            await stream.receive_some(0)


async def test_trio_websocket_stream_reads_a_normal_close_as_end_of_file() -> None:
    async with trio_websocket_pair() as (client, server):
        stream = TrioWebSocketStream(server)
        await client.send_message(b"last")
        await client.aclose(1000)
        assert await stream.receive_some() == b"last"
        assert await stream.receive_some() == b""


async def test_trio_websocket_stream_refuses_a_text_message_with_1003() -> None:
    async with trio_websocket_pair() as (client, server):
        stream = TrioWebSocketStream(server)
        await client.send_message("text")
        with pytest.raises(WebSocketClosed) as closed:
            await stream.receive_some()
        assert closed.value.code == 1003
        with pytest.raises(trio_websocket.ConnectionClosed) as seen:
            await client.get_message()
        assert seen.value.reason is not None and seen.value.reason.code == 1003
