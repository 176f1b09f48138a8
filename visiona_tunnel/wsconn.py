"""A WebSocket carried as a byte stream: what yamux runs on between agent and relay.

``WebSocketStream`` is a ``trio.abc.Stream``: each ``send_all`` becomes one binary message;
``receive_some`` returns the bytes of received binary messages, buffered across message
boundaries (a Go yamux peer writes header and body as two messages, and gorilla splits large
messages into continuation frames). wsproto does the protocol; this module only drives it,
in the caller's tasks, with large reads and no per-message queue (see docs/wsconn.md for
why this is not built on trio-websocket;
:class:`~visiona_tunnel.trio_websocket_stream.TrioWebSocketStream` adapts an existing
trio-websocket connection the same way, for code that already has one).

Closing: a close frame with 1000 (normal) or 1001 (going away) reads as end of file; any
other code raises :class:`WebSocketClosed` with the code, e.g. :data:`CLOSE_REPLACED` when a
relay drops a tunnel because a newer one for the same device arrived.
"""

from __future__ import annotations

import copy
import os
import ssl
import struct
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection, frame_protocol
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import RemoteProtocolError

from .chunks import ChunkBuffer, checked_max_bytes
from .conflict import ConflictDetector
from .wsframes import FrameReader

#: Close code a relay uses when a newer tunnel for the same device replaces this one.
CLOSE_REPLACED = 4001
#: The largest message accepted by default: a Go yamux peer sends a Data frame as large as
#: its window (16 MiB at most in practice) in one message, plus its 12-byte header.
DEFAULT_MAX_MESSAGE_SIZE = 32 * 1024 * 1024
#: Bytes asked of the transport per read.
RECEIVE_SIZE = 256 * 1024
#: Close codes that read as end of file.
EOF_CLOSE_CODES = frozenset({CloseReason.NORMAL_CLOSURE, CloseReason.GOING_AWAY})

Headers = Iterable[tuple[bytes | str, bytes | str]]


_c_apply_mask: Callable[[bytes | bytearray | memoryview, bytes], bytes] | None
try:
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - the wheel ships the extension
    _c_apply_mask = None


def _apply_mask(data: bytes | bytearray | memoryview, mask: bytes | bytearray) -> bytes:
    """XOR with the 4-byte key: websockets' C ``apply_mask`` (tens of GB/s), else wsproto's
    pure-Python masker (about 1.2 GB/s)."""
    if _c_apply_mask is not None:
        return _c_apply_mask(data, bytes(mask))
    return bytes(frame_protocol.XorMaskerSimple(mask).process(bytearray(data)))


def _buffered_frames(connection: Connection) -> bytes:
    """The bytes that came after the handshake in the same read, which wsproto's
    ``Connection`` holds unparsed (it parses only when asked for events, and has not been):
    :class:`~visiona_tunnel.wsframes.FrameReader` reads from here on."""
    buffer = connection._proto._frame_decoder.buffer
    assert connection._proto._frame_decoder.header is None  # nothing parsed yet
    data = bytes(buffer.buffer[buffer.bytes_used :])
    buffer.buffer.clear()
    buffer.bytes_used = 0
    return data


_BINARY_FIN = 0x80 | 0x2  # FIN, no RSV bits, opcode 2 (binary)


def encode_binary_message(
    payload: bytes | bytearray | memoryview | list[bytes | memoryview],
    *,
    client: bool,
    masking_key: bytes | None = None,
) -> list[bytes | memoryview]:
    """One complete binary message as a single frame (RFC 6455 section 5.2), as buffers;
    ``payload`` is one buffer or a list of buffers that make the message together (they
    are framed where they lie, never joined).

    The same bytes as wsproto's ``Connection.send(BytesMessage(data))`` without extensions
    (a test holds them equal), without its four copies of the payload: this is the data
    path, and its copies were the sender's largest cost. Everything else (handshake,
    parsing, control frames, closing) stays with wsproto.
    """
    parts = payload if isinstance(payload, list) else [payload]
    length = sum(len(part) for part in parts)
    second = 0x80 if client else 0
    if length <= 125:
        header = struct.pack("!BB", _BINARY_FIN, second | length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", _BINARY_FIN, second | 126, length)
    else:
        header = struct.pack("!BBQ", _BINARY_FIN, second | 127, length)
    if not client:
        return [header, *(bytes(part) if isinstance(part, bytearray) else part for part in parts)]
    key = masking_key if masking_key is not None else os.urandom(4)  # RFC: unpredictable
    frame: list[bytes | memoryview] = [header + key]
    offset = 0
    for part in parts:
        # Each part is masked on its own, the key turned to where the part starts.
        turn = offset % 4
        frame.append(_apply_mask(part, key[turn:] + key[:turn]))
        offset += len(part)
    return frame


class WebSocketClosed(trio.BrokenResourceError):
    """The WebSocket was closed with a code other than 1000/1001, or broke (1006)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed with code {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason

    def __reduce__(self) -> tuple[type[WebSocketClosed], tuple[int, str]]:
        return (type(self), (self.code, self.reason))


class WebSocketRejected(Exception):
    """The server answered the upgrade request with an HTTP status instead of 101."""

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        super().__init__(f"WebSocket upgrade refused with HTTP {status_code}")
        self.status_code = status_code
        self.headers = headers
        self.body = body


class WebSocketStream(trio.abc.Stream):
    """Bytes over an open WebSocket, driven by wsproto on ``transport``.

    Create it with :func:`connect_websocket_stream` (client) or
    :func:`accept_websocket_stream` (server). Pings are answered; text messages are a
    protocol error (close 1003); messages over ``max_message_size`` close with 1009.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        connection: Connection,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.transport = transport
        self._ws = connection  # the handshake's, and what we send
        self._client = connection.client
        # What we receive: wsproto's rules, faster (4 KiB frames from gorilla's agents).
        self._frames = FrameReader(client=connection.client, apply_mask=_apply_mask)
        self._frames.receive_data(_buffered_frames(connection))
        # On TCP, header and payload go out with one sendmsg, without joining them.
        sock = getattr(transport, "socket", None)  # a SocketStream, or one standing for it
        self._socket = sock if isinstance(sock, trio.socket.SocketType) else None
        self.max_message_size = max_message_size
        self._chunks = ChunkBuffer(coalesce=True)
        self._message_size = 0
        # What we owe the peer: the pong to its latest ping (RFC 6455 5.5.3 lets us answer
        # only the most recent one, so a ping flood costs no memory), and close frames.
        self._pong: bytes | None = None
        self._control: list[bytes] = []
        self._writing = False
        self._write_idle: trio.Event | None = None
        self._eof = False
        self._error: trio.BrokenResourceError | None = None
        self._closed = False
        #: The close code the peer sent (or 1006 if the connection broke), once known.
        self.close_code: int | None = None
        self.close_reason = ""
        self._receive_conflict = ConflictDetector("another task is receiving on this WebSocket")
        self._send_conflict = ConflictDetector("another task is sending on this WebSocket")
        self._handle_events()  # the handshake's read may already hold messages

    # -- receiving -------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        max_bytes = checked_max_bytes(max_bytes)
        with self._receive_conflict:
            await trio.lowlevel.checkpoint()
            while not self._chunks:
                if self._closed:
                    raise trio.ClosedResourceError("this WebSocket stream was closed")
                if self._error is not None:
                    raise copy.copy(self._error) from self._error
                if self._eof:
                    return b""
                await self._read_more()
            return self._chunks.take(max_bytes)

    async def _read_more(self) -> None:
        try:
            data = await self.transport.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if self._closed:
                raise trio.ClosedResourceError("this WebSocket stream was closed") from exc
            self._broken(exc)
            return
        if not data:
            self._broken(None)
            return
        self._frames.receive_data(data)
        self._handle_events()
        if (self._pong is not None or self._control) and not self._writing:
            await self._flush_control()

    async def _flush_control(self) -> None:
        """Send owed pongs and close replies. A short write that a cancelled read must not
        cut in half, so it is shielded (and bounded); a peer that is already gone is no
        error of the read that found its close frame."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 10):
            try:
                await self._write([])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._take_owed()

    def _handle_events(self) -> None:
        for event in self._frames.events():
            kind = type(event)
            if kind is BytesMessage:
                assert isinstance(event, BytesMessage)
                payload = event.data
                self._message_size += len(payload)
                if self._message_size > self.max_message_size:
                    self._fail(CloseReason.MESSAGE_TOO_BIG, "message too big")
                    return
                if payload:
                    self._chunks.append(payload if type(payload) is bytes else bytes(payload))
                if event.message_finished:
                    self._message_size = 0
            elif kind is Ping:
                assert isinstance(event, Ping)
                self._pong = self._ws.send(event.response())
            elif kind is CloseConnection:
                assert isinstance(event, CloseConnection)
                if self._frames.failure is not None:
                    # Not the peer's close: its frames do not parse (1002, 1007 ...). We
                    # say so with our own close frame.
                    self._fail(event.code, event.reason or "protocol error")
                    return
                self.close_code, self.close_reason = event.code, event.reason or ""
                if self._ws.state is ConnectionState.OPEN:  # the reply, unless we closed first
                    self._control.append(self._ws.send(event.response()))
                if event.code in EOF_CLOSE_CODES:
                    self._eof = True
                else:
                    self._error = WebSocketClosed(event.code, self.close_reason)
            elif kind is TextMessage:
                self._fail(CloseReason.UNSUPPORTED_DATA, "text message on a binary stream")
                return

    def _fail(self, code: int, reason: str) -> None:
        """We end the connection: queue our close frame and fail both directions."""
        if self._ws.state is ConnectionState.OPEN:
            self._control.append(self._ws.send(CloseConnection(code=code, reason=reason)))
        self.close_code, self.close_reason = code, reason
        self._error = WebSocketClosed(code, reason)

    def _broken(self, cause: BaseException | None) -> None:
        if self._error is None and not self._eof:
            self.close_code = CloseReason.ABNORMAL_CLOSURE
            self._error = WebSocketClosed(CloseReason.ABNORMAL_CLOSURE, "connection lost")
            self._error.__cause__ = cause

    # -- sending ---------------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_all_vectored([data if not isinstance(data, bytearray) else bytes(data)])

    async def send_all_vectored(self, parts: list[bytes | memoryview]) -> None:
        """``send_all`` of the buffers joined, as one message, without joining them."""
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("this WebSocket stream was closed")
            if self._error is not None:
                raise copy.copy(self._error) from self._error
            if not any(parts):
                await trio.lowlevel.checkpoint()
                return
            if self._ws.state is not ConnectionState.OPEN:
                await trio.lowlevel.checkpoint()
                raise WebSocketClosed(self.close_code or CloseReason.NORMAL_CLOSURE, "closing")
            await self._write(encode_binary_message(parts, client=self._client))

    def _take_owed(self) -> list[bytes]:
        """The control frames owed to the peer, as one buffer (none if nothing is owed)."""
        owed = self._control if self._pong is None else [self._pong, *self._control]
        self._pong, self._control = None, []
        return [b"".join(owed)] if owed else []

    async def _write_finished(self) -> None:
        """Wait until no write is in progress (returns at once if none is)."""
        while self._writing:
            if self._write_idle is None:
                self._write_idle = trio.Event()
            await self._write_idle.wait()

    async def _write(self, frame: list[bytes | memoryview]) -> None:
        """The one path to the transport, shared with pongs and close replies."""
        await self._write_finished()
        frame = [*self._take_owed(), *frame]
        self._writing = True
        try:
            # Pongs and close replies owed while we write go out right after it: the
            # reader leaves them to the write in progress.
            while frame:
                if self._socket is not None:
                    await _sendmsg_all(self._socket, frame)
                else:
                    data = frame[0] if len(frame) == 1 else b"".join(frame)
                    await self.transport.send_all(data)
                frame = [*self._take_owed()]
        except trio.Cancelled:
            # Part of a frame may be on the wire: the framing is lost for good.
            self._broken(None)
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if self._closed:
                raise trio.ClosedResourceError("this WebSocket stream was closed") from exc
            self._broken(exc)
            error = self._error or WebSocketClosed(CloseReason.ABNORMAL_CLOSURE, "connection lost")
            raise copy.copy(error) from exc
        finally:
            self._writing = False
            idle, self._write_idle = self._write_idle, None
            if idle is not None:
                idle.set()

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("this WebSocket stream was closed")
            await self.transport.wait_send_all_might_not_block()

    async def aclose(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str = "") -> None:
        """Send a close frame (if the connection is still open) and close the transport."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            with trio.move_on_after(1):
                # A frame going out (a yamux GoAway sent just before, say) is finished
                # first: skipping our close frame would leave the peer with 1006.
                await self._write_finished()
                broken = self.close_code == CloseReason.ABNORMAL_CLOSURE
                if self._ws.state is ConnectionState.OPEN and not broken:
                    self._control.append(self._ws.send(CloseConnection(code=code, reason=reason)))
                    await self._write([])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(self.transport)


# -- opening -----------------------------------------------------------------------------


async def connect_websocket_stream(
    url: str,
    *,
    headers: Headers = (),
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ssl_context: ssl.SSLContext | None = None,
) -> WebSocketStream:
    """Dial ``ws://`` or ``wss://`` ``url`` and complete the upgrade.

    Raises:
        WebSocketRejected: the server answered with an HTTP status (e.g. 401) instead of 101.
        OSError: the TCP connection failed. trio.BrokenResourceError: it broke mid-handshake.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    transport: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, port)
    if secure:
        transport = trio.SSLStream(
            transport,
            ssl_context or ssl.create_default_context(),
            server_hostname=parts.hostname,
            https_compatible=True,
        )
    host = parts.netloc.rsplit("@", 1)[-1]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        return await client_handshake(
            transport, host, target, headers=headers, max_message_size=max_message_size
        )
    except BaseException:
        await trio.aclose_forcefully(transport)
        raise


async def client_handshake(
    transport: trio.abc.Stream,
    host: str,
    target: str,
    *,
    headers: Headers = (),
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> WebSocketStream:
    """Upgrade an already connected ``transport`` (TCP, TLS, a yamux stream, ...).

    Raises:
        WebSocketRejected: the server answered with an HTTP status instead of 101.
        trio.BrokenResourceError: the connection closed, or the answer was not HTTP.
    """
    ws = WSConnection(ConnectionType.CLIENT)
    extra = [(_b(name), _b(value)) for name, value in headers]
    await transport.send_all(ws.send(Request(host=host, target=target, extra_headers=extra)))
    rejected: RejectConnection | None = None
    body = bytearray()
    while True:
        data = await transport.receive_some(RECEIVE_SIZE)
        try:
            ws.receive_data(bytes(data) or None)
        except RemoteProtocolError as exc:  # not an HTTP answer: a failed dial, like EOF
            raise trio.BrokenResourceError(f"bad WebSocket handshake answer: {exc}") from None
        for event in _handshake_events(ws):
            if isinstance(event, AcceptConnection):
                assert ws.connection is not None
                return WebSocketStream(transport, ws.connection, max_message_size=max_message_size)
            if isinstance(event, RejectConnection):
                rejected = event
                if not event.has_body:
                    raise WebSocketRejected(event.status_code, list(event.headers), b"")
            elif isinstance(event, RejectData) and rejected is not None:
                body += event.data
                if len(body) > 65536:
                    del body[65536:]
                if event.body_finished:
                    status, reply_headers = rejected.status_code, list(rejected.headers)
                    raise WebSocketRejected(status, reply_headers, bytes(body))
        if not data:
            raise trio.BrokenResourceError("connection closed during the WebSocket handshake")


def _handshake_events(ws: WSConnection) -> Iterator[Event]:
    """``ws.events()``, lazily (what follows the 101 must stay unread in ``ws.connection``
    for the stream), with an answer that is not HTTP as a broken dial, like EOF."""
    events = ws.events()
    while True:
        try:
            event = next(events)
        except StopIteration:
            return
        except RemoteProtocolError as exc:
            raise trio.BrokenResourceError(f"bad WebSocket handshake answer: {exc}") from None
        yield event


class WebSocketRequest:
    """An upgrade request received by :func:`receive_websocket_request`: accept or reject it."""

    def __init__(self, transport: trio.abc.Stream, ws: WSConnection, request: Request) -> None:
        self.transport = transport
        self._ws = ws
        self.request = request
        #: The request target: path and query, as sent.
        self.target: str = request.target
        self.headers: list[tuple[bytes, bytes]] = list(request.extra_headers)

    async def accept(
        self, *, headers: Headers = (), max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ) -> WebSocketStream:
        extra = [(_b(name), _b(value)) for name, value in headers]
        await self.transport.send_all(self._ws.send(AcceptConnection(extra_headers=extra)))
        connection = self._ws.connection
        assert connection is not None
        return WebSocketStream(self.transport, connection, max_message_size=max_message_size)

    async def reject(self, status_code: int, body: bytes = b"", *, headers: Headers = ()) -> None:
        """Answer with an HTTP error instead of upgrading, then close the transport."""
        extra = [(_b(name), _b(value)) for name, value in headers]
        if body:
            extra.append((b"content-length", str(len(body)).encode()))
        reply = RejectConnection(status_code=status_code, headers=extra, has_body=bool(body))
        data = self._ws.send(reply)
        if body:
            data += self._ws.send(RejectData(data=body, body_finished=True))
        try:
            await self.transport.send_all(data)
        finally:
            await trio.aclose_forcefully(self.transport)


async def receive_websocket_request(transport: trio.abc.Stream) -> WebSocketRequest:
    """Read an HTTP upgrade request from a freshly accepted ``transport``.

    Raises:
        trio.BrokenResourceError: the peer closed or sent something that is not a WebSocket
            upgrade (a 400 is sent back first when possible).
    """
    ws = WSConnection(ConnectionType.SERVER)
    received = 0
    while True:
        data = await transport.receive_some(RECEIVE_SIZE)
        received += len(data)
        try:
            ws.receive_data(bytes(data) or None)
            for event in ws.events():
                if isinstance(event, Request):
                    return WebSocketRequest(transport, ws, event)
        except Exception as exc:  # wsproto raises RemoteProtocolError for bad handshakes
            with trio.move_on_after(1):
                await transport.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            raise trio.BrokenResourceError(f"not a WebSocket upgrade: {exc}") from exc
        if not data or received > 65536:
            raise trio.BrokenResourceError("no WebSocket upgrade request received")


async def accept_websocket_stream(
    transport: trio.abc.Stream, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> WebSocketStream:
    """Read an upgrade request from ``transport`` and accept it, whatever it asks for."""
    request = await receive_websocket_request(transport)
    return await request.accept(max_message_size=max_message_size)


#: Buffers per ``sendmsg`` call, well under any system's ``IOV_MAX`` (1024 on Linux).
SENDMSG_MAX_BUFFERS = 64


async def _sendmsg_all(sock: trio.socket.SocketType, parts: list[bytes | memoryview]) -> None:
    parts = [part for part in parts if part]
    while parts:
        sent = await sock.sendmsg(parts[:SENDMSG_MAX_BUFFERS])
        while parts and sent >= len(parts[0]):
            sent -= len(parts.pop(0))
        if sent:
            parts[0] = memoryview(parts[0])[sent:]


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


__all__ = [
    "CLOSE_REPLACED",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "EOF_CLOSE_CODES",
    "WebSocketClosed",
    "WebSocketRejected",
    "WebSocketRequest",
    "WebSocketStream",
    "accept_websocket_stream",
    "client_handshake",
    "connect_websocket_stream",
    "receive_websocket_request",
]
