"""A byte stream over an existing trio-websocket connection, for code that already has one
(a handler of ``trio_websocket.serve_websocket``, say). Needs ``trio-websocket`` (the
``services`` extra brings it); ``import visiona_tunnel`` does not import this module.

Slower than :class:`~visiona_tunnel.wsconn.WebSocketStream`: messages go through
trio-websocket's reader task and queue (docs/wsconn.md).
"""

from __future__ import annotations

import trio
import trio_websocket
from wsproto.frame_protocol import CloseReason

from .chunks import ChunkBuffer, checked_max_bytes
from .conflict import ConflictDetector
from .wsconn import EOF_CLOSE_CODES, WebSocketClosed

__all__ = ["TrioWebSocketStream"]


class TrioWebSocketStream(trio.abc.Stream):
    """``receive_some`` gives the bytes of binary messages; ``send_all`` sends one; a close
    with 1000 or 1001 reads as end of file, any other raises
    :class:`~visiona_tunnel.wsconn.WebSocketClosed`."""

    def __init__(self, connection: trio_websocket.WebSocketConnection) -> None:
        self.connection = connection
        self._chunks = ChunkBuffer()
        self._eof = False
        self._receive_conflict = ConflictDetector("another task is receiving on this WebSocket")
        self._send_conflict = ConflictDetector("another task is sending on this WebSocket")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        max_bytes = checked_max_bytes(max_bytes)
        with self._receive_conflict:
            while not self._chunks:
                if self._eof:
                    await trio.lowlevel.checkpoint()
                    return b""
                try:
                    message = await self.connection.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    code, reason = _close_of(exc)
                    if code in EOF_CLOSE_CODES:
                        self._eof = True
                        continue
                    raise WebSocketClosed(code, reason) from exc
                if isinstance(message, str):
                    await self.connection.aclose(CloseReason.UNSUPPORTED_DATA, "text message")
                    raise WebSocketClosed(CloseReason.UNSUPPORTED_DATA, "text message")
                if message:
                    self._chunks.append(message)
            return self._chunks.take(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_conflict:
            if not data:
                await trio.lowlevel.checkpoint()
                return
            try:
                await self.connection.send_message(bytes(data))
            except trio_websocket.ConnectionClosed as exc:
                raise WebSocketClosed(*_close_of(exc)) from exc

    async def send_all_vectored(self, parts: list[bytes | memoryview]) -> None:
        await self.send_all(b"".join(parts))

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.connection.aclose()


def _close_of(exc: trio_websocket.ConnectionClosed) -> tuple[int, str]:
    if exc.reason is None:
        return CloseReason.ABNORMAL_CLOSURE, ""
    return exc.reason.code, exc.reason.reason or ""
