"""A yamux stream as a ``trio.abc.HalfCloseableStream``."""

from __future__ import annotations

import operator
from typing import Protocol

import trio

from ..chunks import ChunkBuffer, checked_max_bytes
from ..conflict import ConflictDetector
from .errors import StreamReset


class StreamSession(Protocol):
    """What a stream asks of its session (:class:`~.session.Session` is one): the whole
    interface between the two, this way. The other way, the session calls the stream's
    :meth:`~Stream.data_received`, :meth:`~Stream.end_received`,
    :meth:`~Stream.reset_received`, :meth:`~Stream.window_opened` and
    :meth:`~Stream.wake_all`, and reads :attr:`~Stream.send_closed`."""

    @property
    def is_closed(self) -> bool: ...

    def raise_if_closed(self) -> None:
        """Raise the session's close reason (a fresh ``SessionClosed``) if it has ended."""

    def queue_data(self, stream: Stream, data: memoryview) -> int:
        """Queue as much of ``data`` as the window and the send queue take; how much."""
        ...

    def send_would_block(self, stream: Stream) -> bool: ...

    def receivable(self, stream: Stream) -> int:
        """How many more bytes the peer may send before it needs more credit from us."""
        ...

    def consumed(self, stream: Stream, nbytes: int) -> None:
        """The application read ``nbytes``: credit for the peer."""

    def close_stream(self, stream: Stream) -> None:
        """Queue our FIN."""

    def abandon_stream(self, stream: Stream) -> None:
        """Closed by us without reading the rest: its data from now on gets RST."""

    def reset_stream(self, stream: Stream) -> None:
        """Queue an RST and forget the stream."""


class Stream(trio.abc.HalfCloseableStream):
    """One yamux stream. Get it from ``Session.open_stream`` or ``Session.accept_stream``.

    ``send_eof`` sends FIN; reading goes on until the peer's FIN. ``aclose`` also stops
    reading: data the peer sends afterwards is answered with RST. ``reset`` aborts both
    directions at once. A reset stream raises :class:`StreamReset` (a
    ``trio.BrokenResourceError``); a dead session raises ``SessionClosed``.
    """

    def __init__(self, session: StreamSession, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._chunks = ChunkBuffer(coalesce=True)
        self._eof = False  # the peer's FIN arrived
        self._reset = False  # RST sent or received
        self._reset_by_peer = False
        self._send_closed = False  # our FIN is queued
        self._closed = False  # aclose() was called
        self._receive_waiter: trio.Event | None = None
        # While receive_at_least waits: data wakes the receiver only once this much is held.
        self._wake_at = 0
        self._send_waiter: trio.Event | None = None
        self._receive_conflict = ConflictDetector("another task is receiving on this stream")
        self._send_conflict = ConflictDetector("another task is sending on this stream")

    def __repr__(self) -> str:
        return f"<yamux Stream {self.stream_id}>"

    # -- receiving -------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        max_bytes = checked_max_bytes(max_bytes)
        with self._receive_conflict:
            # trio's own pattern: a cancel point first; if we never block, a schedule point
            # at the end, after the data is taken (it cannot be cancelled, so nothing is lost).
            await trio.lowlevel.checkpoint_if_cancelled()
            blocked = False
            while not self._chunks:
                self._raise_if_unusable()
                if self._eof:
                    data = b""
                    break
                self._session.raise_if_closed()
                self._receive_waiter = waiter = trio.Event()
                await waiter.wait()
                blocked = True
            else:
                self._raise_if_unusable()
                data = self._take(max_bytes)
            if not blocked:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def receive_at_least(self, max_bytes: int, at_least: int, patience: float) -> bytes:
        """What :meth:`receive_some` returns, but once the first bytes are here, wait up to
        ``patience`` seconds for ``at_least`` bytes in all (``max_bytes`` at most), or for
        as many as the peer may still send if that is less: once it has used up its
        flow-control credit, nothing more comes until we read, so waiting on would only
        stall it. Woken once, when they are here, not per frame.

        For a reader whose every read costs as much downstream whatever its size (a
        forward handing each piece to hypercorn): small frames read one by one as they
        arrive cost much more CPU per byte than a few larger pieces. The wait is shielded
        (the bytes already taken must not be lost to a cancellation) and bounded by
        ``patience``; a cancellation takes effect at the next call.
        """
        max_bytes = operator.index(max_bytes)
        data = await self.receive_some(max_bytes)
        want = min(at_least, max_bytes) - len(data)
        if not data or want <= 0:
            return data
        with self._receive_conflict:
            # No waiting for what cannot come before we read: once the peer has used up
            # its credit, it waits for us.
            want = min(want, self._chunks.size + self._session.receivable(self))
            if self._chunks.size < want:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + patience):
                    self._wake_at = want
                    try:
                        while self._chunks.size < want and not self._ended_for_reading():
                            self._receive_waiter = waiter = trio.Event()
                            await waiter.wait()
                    finally:
                        self._wake_at = 0
                        self._receive_waiter = None
            if not self._chunks or self._closed or self._reset:
                return data  # an ending is for the next read to report
            return data + self._take(max_bytes - len(data))

    def _take(self, max_bytes: int | None) -> bytes:
        """Held bytes (some must be), at most ``max_bytes``; the peer is credited for them."""
        data = self._chunks.take(max_bytes)
        self._session.consumed(self, len(data))
        return data

    def _ended_for_reading(self) -> bool:
        return self._eof or self._closed or self._reset or self._session.is_closed

    # -- the session's side (see StreamSession) ----------------------------------------------

    @property
    def send_closed(self) -> bool:
        """Our FIN is queued (or the stream was closed)."""
        return self._send_closed

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        if self._chunks.size >= self._wake_at:
            self._wake_receiver()

    def end_received(self) -> None:
        self._eof = True
        self._wake_receiver()

    def reset_received(self) -> None:
        self._reset = self._reset_by_peer = True
        self._chunks.clear()
        self.wake_all()

    # -- sending ---------------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_conflict:
            # A cancel point first; the schedule point is a wait for credit if there is
            # one, else a shielded checkpoint once the data is queued (as in receive_some).
            await trio.lowlevel.checkpoint_if_cancelled()
            self._raise_if_cannot_send()
            # The queue references the bytes until they are written: copy mutable buffers.
            view = memoryview(data if isinstance(data, bytes) else bytes(data))
            session = self._session
            blocked = False
            while view:
                sent = session.queue_data(self, view)
                view = view[sent:]
                if view and not sent:
                    self._send_waiter = waiter = trio.Event()
                    await waiter.wait()
                    blocked = True
                    self._raise_if_cannot_send()
            if not blocked:
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            await trio.lowlevel.checkpoint()
            while True:
                self._raise_if_cannot_send()
                if not self._session.send_would_block(self):
                    return
                self._send_waiter = waiter = trio.Event()
                await waiter.wait()

    async def send_eof(self) -> None:
        with self._send_conflict:
            await trio.lowlevel.checkpoint()
            if self._send_closed:
                return
            self._raise_if_unusable()
            self._session.raise_if_closed()
            self._send_closed = True
            self._session.close_stream(self)

    # -- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close both directions; never blocks. Data sent to us afterwards gets RST."""
        if not self._closed:
            self._closed = True
            self._chunks.clear()
            if not self._reset and not self._session.is_closed:
                self._send_closed = True
                self._session.abandon_stream(self)
            self.wake_all()
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        """Abort the stream at once (RST): both sides drop what is buffered."""
        if not self._reset and not self._closed and not self._session.is_closed:
            self._reset = True
            self._chunks.clear()
            self._session.reset_stream(self)
            self.wake_all()
        await trio.lowlevel.checkpoint()

    # -- helpers ----------------------------------------------------------------------------

    def _raise_if_unusable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._reset:
            who = "the peer" if self._reset_by_peer else "this side"
            raise StreamReset(f"stream {self.stream_id} was reset by {who}")

    def _raise_if_cannot_send(self) -> None:
        self._raise_if_unusable()
        if self._send_closed:
            raise trio.ClosedResourceError("send_eof() was called on this stream")
        self._session.raise_if_closed()

    def _wake_receiver(self) -> None:
        waiter = self._receive_waiter
        if waiter is not None:
            self._receive_waiter = None
            waiter.set()

    def window_opened(self) -> None:
        waiter = self._send_waiter
        if waiter is not None:
            self._send_waiter = None
            waiter.set()

    def wake_all(self) -> None:
        self._wake_receiver()
        self.window_opened()
