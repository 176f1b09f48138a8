"""An accepted ASGI WebSocket as a byte stream, for yamux behind an ASGI server (hypercorn).

:class:`AsgiWebSocketStream` has :class:`visiona_tunnel.wsconn.WebSocketStream`'s semantics
over an ASGI ``receive``/``send`` pair instead of a socket:

* ``send_all(data)`` sends one binary message (``websocket.send`` with ``bytes``).
* ``receive_some`` returns the bytes of received binary messages, buffered across message
  boundaries. A text message is a protocol error: we close with 1003 and raise
  :class:`~visiona_tunnel.wsconn.WebSocketClosed`.
* ``websocket.disconnect`` with 1000 or 1001 reads as end of file; any other code raises
  ``WebSocketClosed(code)`` (and so does ``send_all`` afterwards). The server reports the
  code, not the peer: hypercorn 0.18 says 1000 after *our* close and 1006 for everything
  else, including a peer's clean close.
* ``aclose(code, reason)`` sends ``websocket.close`` with them, so ``Tunnel.close(4001,
  ...)`` reaches the agent as close 4001. It wakes a task blocked in ``receive_some``
  (which then raises ``trio.ClosedResourceError``), as trio's stream contract asks.

The ASGI server frames, masks and answers pings; it also enforces the message size limit
(hypercorn: ``websocket_max_message_size``). One caveat of ASGI: an app cannot wait until
the peer can take more, so ``wait_send_all_might_not_block`` is only a checkpoint
(``send`` itself blocks while the server writes; hypercorn 0.18 writes in a shielded
scope, so that wait cannot be cancelled: see ``tunnel_app.TunnelHypercornConfig``).

After ``aclose``, whoever owns the ASGI connection should call :meth:`drain` before it
returns, so that the peer's close reply is read (see its docstring).
"""

from __future__ import annotations

import contextlib
import copy

import trio
from wsproto.frame_protocol import CloseReason

from visiona_tunnel.chunks import ChunkBuffer, checked_max_bytes
from visiona_tunnel.conflict import ConflictDetector
from visiona_tunnel.wsconn import WebSocketClosed

from ..common.http import Message, Receive, Send

_EOF_CODES = frozenset({CloseReason.NORMAL_CLOSURE, CloseReason.GOING_AWAY})
#: How long ``aclose`` waits for the server to take the close message.
CLOSE_TIMEOUT = 5.0


class AsgiWebSocketStream(trio.abc.Stream):
    """Bytes over an *accepted* ASGI WebSocket (``websocket.accept`` already sent).

    The stream owns ``receive`` and ``send`` from now on: nothing else may call them until
    it is closed (then only :meth:`drain` calls ``receive``).
    """

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._chunks = ChunkBuffer()
        self._eof = False
        self._error: WebSocketClosed | None = None
        self._closed = False  # our aclose() was called
        self._close_sent = False
        self._disconnected = False  # websocket.disconnect was received
        self._receive_scope: trio.CancelScope | None = None
        #: The code of the ``websocket.disconnect`` (or of our own close), once known.
        self.close_code: int | None = None
        self.close_reason = ""
        self._receive_conflict = ConflictDetector("another task is receiving on this WebSocket")
        self._send_conflict = ConflictDetector("another task is sending on this WebSocket")

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
                message = await self._next_message()
                if self._closed:  # aclose() came while we waited
                    raise trio.ClosedResourceError("this WebSocket stream was closed")
                assert message is not None
                await self._handle(message)
            return self._chunks.take(max_bytes)

    async def _next_message(self) -> Message | None:
        """The next ASGI event; None if ``aclose`` interrupted the wait."""
        with trio.CancelScope() as self._receive_scope:
            if self._closed:
                self._receive_scope.cancel()
            return await self._receive()
        return None

    async def _handle(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "websocket.receive":
            data = message.get("bytes")
            if data is None:
                await self._fail(CloseReason.UNSUPPORTED_DATA, "text message on a binary stream")
            elif data:
                self._chunks.append(data if type(data) is bytes else bytes(data))
        elif kind == "websocket.disconnect":
            self._disconnected = True
            code = int(message.get("code", CloseReason.ABNORMAL_CLOSURE))
            self.close_code, self.close_reason = code, message.get("reason") or ""
            if code in _EOF_CODES:
                self._eof = True
            else:
                self._error = WebSocketClosed(code, self.close_reason)
        else:
            await self._fail(CloseReason.INTERNAL_ERROR, f"unexpected ASGI event {kind!r}")

    async def _fail(self, code: int, reason: str) -> None:
        """We end the connection: close it with ``code``; both directions fail."""
        self._error = WebSocketClosed(code, reason)
        self.close_code, self.close_reason = code, reason
        await self._send_close(code, reason)

    # -- sending ---------------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_conflict:
            self._check_sendable()
            if not data:
                await trio.lowlevel.checkpoint()
                return
            try:
                await self._send({"type": "websocket.send", "bytes": bytes(data)})
            except OSError as exc:
                # ASGI: a server raises an OSError subclass for a send on a closed
                # connection (hypercorn 0.18 drops it silently; the reader notices instead).
                if self._error is None:
                    self._error = WebSocketClosed(CloseReason.ABNORMAL_CLOSURE, "connection lost")
                raise copy.copy(self._error) from exc

    def _check_sendable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this WebSocket stream was closed")
        if self._error is not None:
            raise copy.copy(self._error) from self._error
        if self._eof or self._close_sent:
            raise WebSocketClosed(self.close_code or CloseReason.NORMAL_CLOSURE, "closing")

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("this WebSocket stream was closed")
            await trio.lowlevel.checkpoint()

    # -- closing ---------------------------------------------------------------------------

    async def aclose(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str = "") -> None:
        """Close with ``code`` and ``reason`` (unless the connection is already gone or was
        closed by us). Idempotent; a cancelled ``aclose`` still closes: the close message
        is shielded, bounded by :data:`CLOSE_TIMEOUT`."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()
        with trio.CancelScope(shield=True):
            await self._send_close(code, reason)
        await trio.lowlevel.checkpoint()

    async def _send_close(self, code: int, reason: str) -> None:
        if self._close_sent or self._disconnected:
            return
        self._close_sent = True
        with trio.move_on_after(CLOSE_TIMEOUT):
            with contextlib.suppress(OSError):  # the connection is gone already
                await self._send({"type": "websocket.close", "code": code, "reason": reason})

    async def drain(self) -> None:
        """Read and drop ASGI events until ``websocket.disconnect`` (returns at once if it
        has come). For the owner of the connection, after ``aclose`` and before returning.

        Why: hypercorn 0.18 closes the TCP connection as soon as the app returns, without
        waiting for the peer's close reply. A peer still writing then (a yamux agent in
        the middle of a transfer) gets a reset, and may never read our close frame: a
        replaced agent would see 1006 instead of 4001 and redial at once. Waiting for the
        disconnect completes the closing handshake first. Bound it with a timeout: a peer
        that never answers our close could keep it going.
        """
        with self._receive_conflict:
            while not self._disconnected:
                message = await self._receive()
                if message.get("type") == "websocket.disconnect":
                    self._disconnected = True
            await trio.lowlevel.checkpoint()


__all__ = ["CLOSE_TIMEOUT", "AsgiWebSocketStream"]
