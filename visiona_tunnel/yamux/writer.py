"""Moving queued frames from the core onto the transport: the only code that writes to it.

Frames reach the transport in two ways, never at once: the writer task (``run``), which
may wait for the transport, and a direct non-blocking ``writev`` by whichever task queued
the frames (``wake``), allowed only while the writer task is idle and the transport is a
TCP socket.
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable

import trio

from .connection import YamuxConnection
from .errors import SessionClosed, SessionTimeout

#: Data bytes per write batch.
WRITE_BATCH = 256 * 1024
#: More buffers than this in one batch are joined first (Linux allows 1024 per sendmsg).
_MAX_IOVECS = 128

Buffers = list[bytes | memoryview]


class FrameWriter:
    """Writes what ``conn`` has queued to ``transport``; ``on_written`` runs after each write."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        conn: YamuxConnection,
        on_written: Callable[[], None],
    ) -> None:
        self._transport = transport
        self._conn = conn
        self._on_written = on_written
        # For TCP, frames can be written straight to the socket (see _write_now).
        self._socket = transport.socket if isinstance(transport, trio.SocketStream) else None
        # A transport that takes several buffers as one write (a WebSocket: one message)
        # gets the frames where they lie, not joined into one copy first.
        self._send_all_vectored: Callable[[Buffers], Awaitable[None]] | None = getattr(
            transport, "send_all_vectored", None
        )
        self._wakeup: trio.Event | None = None
        self._unsent: Buffers = []
        self._closing = False
        #: When the write in progress began (``inf`` when idle); the session's timer task
        #: cancels ``scope`` when a write makes no progress for too long.
        self.started = math.inf
        self.scope = trio.CancelScope()
        #: Set when the writer task has flushed everything after ``close`` (or failed).
        self.done = trio.Event()

    def wake(self) -> None:
        """Get queued frames written: at once by this task if the socket takes them all,
        else by the writer task."""
        waiter = self._wakeup
        if waiter is None:
            return  # the writer is busy and looks at the queue again when it is done
        if self._socket is not None and not self._closing and self._write_now():
            return
        self._wakeup = None
        waiter.set()

    def close(self) -> None:
        """No more direct writes: the task flushes what is queued, then ends."""
        self._closing = True
        waiter, self._wakeup = self._wakeup, None
        if waiter is not None:
            waiter.set()

    def _write_now(self) -> bool:
        """Write what is queued with one non-blocking ``writev``, only while the writer
        task is idle. It never waits and never yields, so no cancellation can cut a frame
        in half; what the kernel does not take is left to the writer task. This saves a
        task switch per message, which is most of a small round trip's cost."""
        assert self._socket is not None
        fd = self._socket.fileno()  # -1 once closed: never write to a recycled number
        if fd < 0:
            return False
        parts = self._conn.frames_to_send(WRITE_BATCH)
        if len(parts) > _MAX_IOVECS:
            parts = [b"".join(parts)]
        try:
            sent = os.writev(fd, parts)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._unsent = parts  # the writer task meets the error and reports it
            return False
        self._unsent = _advance(parts, sent)
        self._on_written()
        return not self._unsent and not self._conn.has_data_to_send()

    async def run(self) -> SessionClosed | None:
        """The writer task: write until closed and drained. Returns why it failed, if it did."""
        conn = self._conn
        try:
            with self.scope:
                while True:
                    if not self._unsent and not conn.has_data_to_send():
                        if self._closing:
                            return None
                        self._wakeup = waiter = trio.Event()
                        await waiter.wait()
                        continue
                    self.started = trio.current_time()
                    if self._unsent:
                        unsent, self._unsent = self._unsent, []
                        await self._send_vectored(unsent)
                    elif self._socket is not None:
                        await self._send_vectored(conn.frames_to_send(WRITE_BATCH))
                    elif self._send_all_vectored is not None:
                        await self._send_all_vectored(conn.frames_to_send(WRITE_BATCH))
                    else:
                        await self._transport.send_all(conn.data_to_send(WRITE_BATCH))
                    self.started = math.inf
                    self._on_written()
            return SessionTimeout("a write to the transport timed out")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            reason = SessionClosed(f"the transport failed: {exc!r}")
            reason.__cause__ = exc
            return reason
        finally:
            self.started = math.inf
            self.done.set()

    async def _send_vectored(self, parts: Buffers) -> None:
        """``send_all`` of several buffers with one ``sendmsg``: headers and bodies are
        written where they lie, without joining them into one copy first."""
        assert self._socket is not None
        if len(parts) > _MAX_IOVECS:
            parts = [b"".join(parts)]
        while parts:
            parts = _advance(parts, await self._socket.sendmsg(parts))


def _advance(parts: Buffers, sent: int) -> Buffers:
    """What is left of ``parts`` after the first ``sent`` bytes were written."""
    done = 0
    while done < len(parts) and sent >= len(parts[done]):
        sent -= len(parts[done])
        done += 1
    del parts[:done]
    if sent:
        parts[0] = memoryview(parts[0])[sent:]
    return parts
