"""Helpers for the yamux session tests: hand-written frames, a raw peer, test transports."""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import NamedTuple

import trio
import trio.testing
from support.streams import receive_exactly as receive_exactly

from visiona_tunnel.yamux import Config, Session, open_session

# Wire numbers, spelled out here rather than imported so that the tests pin them.
HEADER = struct.Struct("!BBHII")
DATA, WINDOW_UPDATE, PING, GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 1, 2, 4, 8
GO_AWAY_NORMAL, GO_AWAY_PROTOCOL_ERROR = 0, 1
INITIAL_WINDOW = 256 * 1024

#: Every test that uses these helpers fails (instead of hanging) after this many seconds.
TEST_DEADLINE = 20.0

#: Raw peers never answer pings, so sessions facing one must not send keepalives.
NO_KEEPALIVE = Config(enable_keepalive=False)


def frame(
    type: int,
    flags: int,
    stream_id: int,
    length: int | None = None,
    body: bytes = b"",
    *,
    version: int = 0,
) -> bytes:
    """One frame's bytes; ``length`` defaults to the size of ``body``."""
    if length is None:
        length = len(body)
    return HEADER.pack(version, type, flags, stream_id, length) + body


def syn(stream_id: int, delta: int = 0) -> bytes:
    """Open a stream the way hashicorp does: WindowUpdate|SYN carrying a window delta."""
    return frame(WINDOW_UPDATE, SYN, stream_id, delta)


def data(stream_id: int, body: bytes, flags: int = 0) -> bytes:
    return frame(DATA, flags, stream_id, body=body)


def window_update(stream_id: int, delta: int, flags: int = 0) -> bytes:
    return frame(WINDOW_UPDATE, flags, stream_id, delta)


def ping(opaque: int, flags: int = SYN) -> bytes:
    return frame(PING, flags, 0, opaque)


def pattern(size: int) -> bytes:
    """``size`` bytes where byte ``i`` is ``i % 256``, as hashicorp's tests send."""
    return (bytes(range(256)) * (size // 256 + 1))[:size]


class Frame(NamedTuple):
    version: int
    type: int
    flags: int
    stream_id: int
    length: int
    body: bytes

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


class FrameParser:
    """Splits a byte stream into frames; only Data frames have a body."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Frame]:
        self._buffer += chunk
        frames = []
        while len(self._buffer) >= HEADER.size:
            version, type_, flags, stream_id, length = HEADER.unpack_from(self._buffer)
            body_size = length if type_ == DATA else 0
            end = HEADER.size + body_size
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            frames.append(Frame(version, type_, flags, stream_id, length, body))
        return frames


class RawPeer:
    """The far end of a session's transport, driven by hand: write frames, read frames."""

    def __init__(self, transport: trio.abc.Stream) -> None:
        self.transport = transport
        self.received: list[Frame] = []
        self._parser = FrameParser()
        self._pending: deque[Frame] = deque()

    async def send(self, *frames: bytes) -> None:
        await self.transport.send_all(b"".join(frames))

    async def receive_frame(self) -> Frame | None:
        """The next frame from the session, or None once the transport has ended."""
        while not self._pending:
            try:
                chunk = await self.transport.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                return None
            self._pending.extend(self._parser.feed(chunk))
        received = self._pending.popleft()
        self.received.append(received)
        return received

    async def receive_until(self, predicate: Callable[[Frame], bool]) -> Frame:
        """Read frames until one matches ``predicate``; fail if the transport ends first."""
        while True:
            received = await self.receive_frame()
            assert received is not None, f"transport ended; frames so far: {self.received}"
            if predicate(received):
                return received

    async def receive_until_eof(self) -> list[Frame]:
        """Read every remaining frame; returns all frames received since the start."""
        while await self.receive_frame() is not None:
            pass
        return self.received

    async def discard_frames(self) -> None:
        """Read (and keep a record of) frames until the transport ends; never answer."""
        await self.receive_until_eof()

    async def answer_pings(self) -> None:
        """Read frames until the transport ends, answering each ping like a yamux peer."""
        while (received := await self.receive_frame()) is not None:
            if received.type == PING and received.has(SYN):
                await self.send(ping(received.length, flags=ACK))

    def frames_for(self, stream_id: int) -> list[Frame]:
        return [f for f in self.received if f.stream_id == stream_id and f.type != PING]


def is_ping_ack(opaque: int) -> Callable[[Frame], bool]:
    return lambda f: f.type == PING and f.has(ACK) and f.length == opaque


def is_go_away(f: Frame) -> bool:
    return f.type == GO_AWAY


class ControlledStream(trio.abc.HalfCloseableStream):
    """A transport wrapper that records the frames sent through it and can stall writes.

    ``block_writes()`` plays the part of the ``writeBlocker`` mutex in hashicorp's tests:
    ``send_all`` waits until ``unblock_writes()`` (or ``aclose()``).
    """

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.sent_frames: list[Frame] = []
        self._parser = FrameParser()
        self._gate = trio.Event()
        self._gate.set()

    def block_writes(self) -> None:
        if self._gate.is_set():
            self._gate = trio.Event()

    def unblock_writes(self) -> None:
        self._gate.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._gate.wait()
        await self.inner.send_all(data)
        self.sent_frames.extend(self._parser.feed(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self._gate.wait()
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        self._gate.set()
        await self.inner.aclose()


class Transports(NamedTuple):
    """Two connected transport ends; ``networked`` is true for real sockets."""

    client: trio.abc.HalfCloseableStream
    server: trio.abc.HalfCloseableStream
    networked: bool


def memory_transports() -> Transports:
    client, server = trio.testing.memory_stream_pair()
    return Transports(client, server, networked=False)


def controlled(transports: Transports) -> tuple[Transports, ControlledStream, ControlledStream]:
    """Wrap both ends in :class:`ControlledStream`; returns the new pair and the two wrappers."""
    client = ControlledStream(transports.client)
    server = ControlledStream(transports.server)
    return Transports(client, server, transports.networked), client, server


async def tcp_transports(*, reversed_roles: bool = False) -> Transports:
    """A TCP connection over 127.0.0.1; with ``reversed_roles`` the accepting end is the client."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        listener = listeners[0]
        port = listener.socket.getsockname()[1]
        dialed = await trio.open_tcp_stream("127.0.0.1", port)
        accepted = await listener.accept()
    finally:
        for each in listeners:
            await each.aclose()
    if reversed_roles:
        return Transports(accepted, dialed, networked=True)
    return Transports(dialed, accepted, networked=True)


@asynccontextmanager
async def open_session_pair(
    transports: Transports | None = None, *, config: Config | None = None
) -> AsyncIterator[tuple[Session, Session]]:
    """A client and a server session talking to each other (over memory streams by default)."""
    if transports is None:
        transports = memory_transports()
    config = config or Config()
    with trio.fail_after(TEST_DEADLINE):
        async with AsyncExitStack() as stack:
            stack.push_async_callback(transports.client.aclose)
            stack.push_async_callback(transports.server.aclose)
            client = await stack.enter_async_context(
                open_session(transports.client, client=True, config=config)
            )
            server = await stack.enter_async_context(
                open_session(transports.server, client=False, config=config)
            )
            yield client, server


@asynccontextmanager
async def open_raw_pair(
    *, client: bool = False, config: Config = NO_KEEPALIVE, transports: Transports | None = None
) -> AsyncIterator[tuple[Session, RawPeer]]:
    """A session whose peer is a :class:`RawPeer`. By default the session is the server."""
    if transports is None:
        transports = memory_transports()
    session_end, raw_end = (
        (transports.client, transports.server) if client else (transports.server, transports.client)
    )
    with trio.fail_after(TEST_DEADLINE):
        async with AsyncExitStack() as stack:
            stack.push_async_callback(raw_end.aclose)
            stack.push_async_callback(session_end.aclose)
            session = await stack.enter_async_context(
                open_session(session_end, client=client, config=config)
            )
            yield session, RawPeer(raw_end)


async def receive_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    while chunk := await stream.receive_some():
        received += chunk
    return bytes(received)


async def still_blocked(async_fn: Callable[[], Awaitable[object]]) -> bool:
    """Whether ``async_fn()`` is still waiting once every task is blocked (it is then cancelled)."""
    finished = False

    async def run() -> None:
        nonlocal finished
        await async_fn()
        finished = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return not finished
