"""How a tunnel ends, as the bytes a raw agent receives: every ending puts its yamux GoAway
(with the right code) and then its WebSocket close frame (with the right code) on the wire
before the TCP close. The relay is the library's listener and registry on loopback; the
agent is wsproto and hand-written yamux frames."""

from __future__ import annotations

import functools
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Request,
    TextMessage,
)

from visiona_tunnel import TunnelRegistry, admit_with, serve_tunnel_listener
from visiona_tunnel.wsconn import CLOSE_REPLACED

TIMEOUT = 10.0
GO_AWAY = 3
GO_AWAY_NORMAL, GO_AWAY_PROTOCOL_ERROR = 0, 1


def yamux_frame(type_: int, flags: int, stream_id: int, length: int, body: bytes = b"") -> bytes:
    return struct.pack(">BBHII", 0, type_, flags, stream_id, length) + body


async def device(token: str) -> str | None:
    await trio.lowlevel.checkpoint()
    return token


@attrs.define
class RawAgent:
    """A WebSocket client speaking yamux by hand; records what it receives, in order."""

    tcp: trio.SocketStream
    ws: WSConnection
    #: ("yamux", type, length) per yamux frame; ("close", code) for the close frame.
    received: list[tuple[str, int, int]] = attrs.field(factory=list)
    _yamux: bytes = b""

    async def send_yamux(self, data: bytes) -> None:
        await self.tcp.send_all(self.ws.send(Message(data=data)))

    async def send_raw(self, data: bytes) -> None:
        await self.tcp.send_all(data)

    async def read_to_the_end(self) -> None:
        """Everything until the relay closes the TCP connection."""
        with trio.fail_after(TIMEOUT):
            while data := await self.tcp.receive_some():
                self.ws.receive_data(data)
                for event in self.ws.events():
                    self._take(event)
        await self.tcp.aclose()

    def _take(self, event: Event) -> None:
        if isinstance(event, BytesMessage):
            self._yamux += bytes(event.data)
            while len(self._yamux) >= 12:
                _, type_, _, _, length = struct.unpack(">BBHII", self._yamux[:12])
                size = 12 + (length if type_ == 0 else 0)  # only Data frames carry a body
                if len(self._yamux) < size:
                    break
                self.received.append(("yamux", type_, length))
                self._yamux = self._yamux[size:]
        elif isinstance(event, CloseConnection):
            self.received.append(("close", event.code, 0))

    def ending(self) -> list[tuple[str, int, int]]:
        """The GoAway frames and the close frame, in the order they came."""
        return [item for item in self.received if item[0] == "close" or item[1] == GO_AWAY]


@asynccontextmanager
async def relay() -> AsyncIterator[tuple[TunnelRegistry, int]]:
    registry = TunnelRegistry()
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_tunnel_listener, registry, admit_with(device), host="127.0.0.1", port=0
        )
        urls: list[str] = await nursery.start(serve)
        yield registry, int(urls[0].rsplit(":", 1)[1])
        nursery.cancel_scope.cancel()


async def connect(port: int, token: str) -> RawAgent:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    await tcp.send_all(ws.send(Request(host="relay", target=f"/tunnel/connect?token={token}")))
    with trio.fail_after(TIMEOUT):
        while True:
            ws.receive_data(await tcp.receive_some())
            if any(isinstance(event, AcceptConnection) for event in ws.events()):
                return RawAgent(tcp, ws)


async def test_a_yamux_protocol_violation_ends_with_go_away_1_then_close_1002() -> None:
    async with relay() as (registry, port):
        agent = await connect(port, "device-1")
        await registry.wait_for("device-1")
        await agent.send_yamux(yamux_frame(9, 0, 0, 0))  # no such frame type
        await agent.read_to_the_end()
    assert agent.ending() == [("yamux", GO_AWAY, GO_AWAY_PROTOCOL_ERROR), ("close", 1002, 0)]


@pytest.mark.parametrize(("code", "why"), [(1000, "removed"), (1001, "shutting down")])
async def test_closing_a_tunnel_sends_go_away_0_then_its_close_code(code: int, why: str) -> None:
    async with relay() as (registry, port):
        agent = await connect(port, "device-1")
        tunnel = await registry.wait_for("device-1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.read_to_the_end)
            await tunnel.close(code, why)
    assert agent.ending() == [("yamux", GO_AWAY, GO_AWAY_NORMAL), ("close", code, 0)]


async def test_a_replaced_tunnel_gets_go_away_0_then_4001() -> None:
    async with relay() as (registry, port):
        older = await connect(port, "device-1")
        await registry.wait_for("device-1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(older.read_to_the_end)
            newer = await connect(port, "device-1")
        await newer.tcp.aclose()
    assert older.ending() == [("yamux", GO_AWAY, GO_AWAY_NORMAL), ("close", CLOSE_REPLACED, 0)]


async def test_a_text_message_ends_with_close_1003() -> None:
    async with relay() as (registry, port):
        agent = await connect(port, "device-1")
        await registry.wait_for("device-1")
        await agent.send_raw(agent.ws.send(TextMessage(data="not yamux")))
        await agent.read_to_the_end()
    assert ("close", 1003, 0) in agent.ending()


async def test_an_unmasked_frame_from_the_agent_ends_with_close_1002() -> None:
    async with relay() as (registry, port):
        agent = await connect(port, "device-1")
        await registry.wait_for("device-1")
        await agent.send_raw(bytes([0x82, 0x01, 0x00]))  # binary, unmasked: not from a client
        await agent.read_to_the_end()
    assert ("close", 1002, 0) in agent.ending()
