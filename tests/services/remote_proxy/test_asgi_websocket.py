"""AsgiWebSocketStream: trio's stream contract over an in-memory ASGI pair, and each of its
mappings between bytes and ASGI events (messages, close codes, text, drain)."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from visiona_services.common.http import Message
from visiona_services.remote_proxy.asgi_websocket import AsgiWebSocketStream
from visiona_tunnel.wsconn import CLOSE_REPLACED, WebSocketClosed

# -- an in-memory ASGI "server" pair ------------------------------------------------------


class _Link:
    """One WebSocket connection between two accepted ASGI apps, as a server would run it:
    ``websocket.send`` becomes the peer's ``websocket.receive``; ``websocket.close``
    ends the connection (the peer gets the code, the closer 1000); a send on an ended
    connection raises an ``OSError`` (what the ASGI spec asks of servers)."""

    def __init__(self) -> None:
        self.closed = False
        self.inboxes = [trio.open_memory_channel[Message](math.inf) for _ in range(2)]

    def end(self, side: int) -> AsgiWebSocketStream:
        own, peer = self.inboxes[side][0], self.inboxes[1 - side][0]

        async def send(message: Message) -> None:
            await trio.lowlevel.checkpoint()
            if message["type"] == "websocket.send":
                if self.closed:
                    raise ConnectionResetError("the WebSocket is closed")
                peer.send_nowait({"type": "websocket.receive", "bytes": message["bytes"]})
            elif message["type"] == "websocket.close" and not self.closed:
                self.closed = True
                peer.send_nowait({"type": "websocket.disconnect", "code": message["code"]})
                own.send_nowait({"type": "websocket.disconnect", "code": 1000})

        return AsgiWebSocketStream(self.inboxes[side][1].receive, send)


async def asgi_pair() -> tuple[AsgiWebSocketStream, AsgiWebSocketStream]:
    await trio.lowlevel.checkpoint()
    link = _Link()
    return link.end(0), link.end(1)


async def test_passes_trio_two_way_stream_checks() -> None:
    # No clogged maker: ASGI has no way to wait until the peer can take more.
    await trio.testing.check_two_way_stream(asgi_pair, None)


# -- one ASGI end driven by the test ------------------------------------------------------


class FakeServer:
    """The server side of one accepted ASGI WebSocket: the test feeds what ``receive``
    returns and reads what the stream sent."""

    def __init__(self) -> None:
        self._to_app, self._app_inbox = trio.open_memory_channel[Message](math.inf)
        self.sent: list[Message] = []
        self.stream = AsgiWebSocketStream(self._app_inbox.receive, self._send)

    async def _send(self, message: Message) -> None:
        await trio.lowlevel.checkpoint()
        self.sent.append(message)

    def deliver(self, message: Message) -> None:
        self._to_app.send_nowait(message)

    def deliver_bytes(self, *messages: bytes) -> None:
        for data in messages:
            self.deliver({"type": "websocket.receive", "bytes": data, "text": None})

    def disconnect(self, code: int) -> None:
        self.deliver({"type": "websocket.disconnect", "code": code})


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


async def test_send_all_sends_one_binary_message(server: FakeServer) -> None:
    await server.stream.send_all(memoryview(b"yamux frame"))
    assert server.sent == [{"type": "websocket.send", "bytes": b"yamux frame"}]
    assert type(server.sent[0]["bytes"]) is bytes


async def test_send_all_of_nothing_sends_nothing(server: FakeServer) -> None:
    await server.stream.send_all(b"")
    assert server.sent == []


async def test_receive_is_buffered_across_messages(server: FakeServer) -> None:
    server.deliver_bytes(b"abc", b"", b"defg")
    assert await server.stream.receive_some(2) == b"ab"
    assert await server.stream.receive_some(10) == b"c"
    assert await server.stream.receive_some() == b"defg"


@pytest.mark.parametrize("code", [1000, 1001])
async def test_disconnect_1000_or_1001_is_eof(server: FakeServer, code: int) -> None:
    server.deliver_bytes(b"last")
    server.disconnect(code)
    assert await server.stream.receive_some() == b"last"
    assert await server.stream.receive_some() == b""
    assert await server.stream.receive_some() == b""
    assert server.stream.close_code == code


@pytest.mark.parametrize("code", [1006, 1011, CLOSE_REPLACED])
async def test_other_disconnect_codes_raise_websocket_closed(server: FakeServer, code: int) -> None:
    server.disconnect(code)
    with pytest.raises(WebSocketClosed) as info:
        await server.stream.receive_some()
    assert info.value.code == code
    with pytest.raises(WebSocketClosed):
        await server.stream.send_all(b"x")


async def test_send_after_eof_raises_broken(server: FakeServer) -> None:
    server.disconnect(1000)
    assert await server.stream.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError):
        await server.stream.send_all(b"x")


async def test_text_message_closes_1003_and_raises(server: FakeServer) -> None:
    server.deliver({"type": "websocket.receive", "bytes": None, "text": "hello"})
    with pytest.raises(WebSocketClosed) as info:
        await server.stream.receive_some()
    assert info.value.code == 1003
    assert server.sent == [
        {"type": "websocket.close", "code": 1003, "reason": "text message on a binary stream"}
    ]
    with pytest.raises(WebSocketClosed):
        await server.stream.send_all(b"x")


async def test_aclose_sends_code_and_reason(server: FakeServer) -> None:
    await server.stream.aclose(CLOSE_REPLACED, "replaced")
    assert server.sent == [
        {"type": "websocket.close", "code": CLOSE_REPLACED, "reason": "replaced"}
    ]


async def test_aclose_defaults_to_1000(server: FakeServer) -> None:
    await server.stream.aclose()
    assert server.sent == [{"type": "websocket.close", "code": 1000, "reason": ""}]


async def test_aclose_is_idempotent(server: FakeServer) -> None:
    await server.stream.aclose(CLOSE_REPLACED, "replaced")
    await server.stream.aclose()
    assert len(server.sent) == 1


async def test_no_close_is_sent_after_disconnect(server: FakeServer) -> None:
    server.disconnect(1006)
    with pytest.raises(WebSocketClosed):
        await server.stream.receive_some()
    await server.stream.aclose()
    assert server.sent == []


async def test_aclose_from_another_task_wakes_the_reader(server: FakeServer) -> None:
    async def read() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await server.stream.receive_some()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            await server.stream.aclose(CLOSE_REPLACED, "replaced")


async def test_drain_reads_until_disconnect(server: FakeServer) -> None:
    await server.stream.aclose()
    server.deliver_bytes(b"in flight", b"more")
    server.disconnect(1000)
    server.deliver_bytes(b"never read")
    with trio.fail_after(5):
        await server.stream.drain()
    assert server._app_inbox.statistics().current_buffer_used == 1


async def test_drain_returns_at_once_after_disconnect(server: FakeServer) -> None:
    server.disconnect(1006)
    with pytest.raises(WebSocketClosed):
        await server.stream.receive_some()
    with trio.fail_after(5):
        await server.stream.drain()


async def test_os_error_on_send_is_broken(server: FakeServer) -> None:
    async def refuse(message: Message) -> None:
        await trio.lowlevel.checkpoint()
        raise ConnectionResetError("gone")

    stream = AsgiWebSocketStream(server._app_inbox.receive, refuse)
    with pytest.raises(WebSocketClosed) as info:
        await stream.send_all(b"x")
    assert info.value.code == 1006
