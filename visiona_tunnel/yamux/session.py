"""The trio driver: runs a :class:`YamuxConnection` over any ``trio.abc.Stream``.

Task ownership (all inside the nursery of :func:`open_session`):

* the **reader** receives from the transport and feeds the core; it only appends to
  per-stream buffers (bounded by the receive window) and sets events, so a slow consumer
  never stops it, and pings and window updates keep flowing;
* the **writer** sends what the core has queued (control frames first) as one ``send_all``
  per batch, so the transport has a single writer;
* the **timer** task sends keepalive pings and enforces the stream open/close timeouts.

When the session ends, for whatever reason, every waiting task wakes with a
:class:`SessionClosed` (or a subclass saying why).
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .config import Config
from .connection import YamuxConnection
from .core_errors import GoAwayInForce, ProtocolViolation
from .errors import (
    GoAwayError,
    KeepAliveTimeout,
    SessionClosed,
    SessionEnded,
    SessionTimeout,
    session_error_of,
)
from .events import (
    DataReceived,
    Event,
    GoAwayReceived,
    PongReceived,
    ResetReceived,
    StreamAcked,
    StreamEnded,
    StreamOpened,
    WindowUpdated,
)
from .stream import Stream
from .writer import FrameWriter

#: Bytes asked of the transport per read.
RECEIVE_SIZE = 256 * 1024
#: The most data bytes the send queue holds.
WRITE_QUEUE_LIMIT = 1024 * 1024
#: The reader pauses while more control frames than this wait to be sent: a peer flooding
#: pings or SYNs without reading our answers must not grow our memory.
CONTROL_QUEUE_LIMIT = 4096

_OPEN_TIMER = 0
_CLOSE_TIMER = 1


def _wake(event: trio.Event | None) -> None:
    if event is not None:
        event.set()


@asynccontextmanager
async def open_session(
    transport: trio.abc.Stream, *, client: bool, config: Config | None = None
) -> AsyncIterator[Session]:
    """Run a yamux session over ``transport`` for the duration of the ``async with``.

    Args:
        transport: any connected byte stream (TCP, TLS, a WebSocket adapter, ...).
        client: ``True`` on the side that opens odd stream ids (the dialing side).
        config: defaults mirror hashicorp/yamux.

    Leaving the block flushes what is queued, sends GoAway, closes the transport and ends
    every task the session started. The block itself is never cancelled by the session.
    """
    session = Session(transport, client=client, config=config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session._run_reader)
        nursery.start_soon(session._run_writer)
        nursery.start_soon(session._run_timers)
        try:
            yield session
        finally:
            try:
                await session.aclose()
            finally:
                nursery.cancel_scope.cancel()


class Session:
    """A yamux session. Create it with :func:`open_session`."""

    def __init__(
        self, transport: trio.abc.Stream, *, client: bool, config: Config | None = None
    ) -> None:
        self.config = config = config or Config()
        self.client = client
        self._transport = transport
        self._conn = YamuxConnection(client=client, config=config)
        self._streams: dict[int, Stream] = {}
        self._incoming: dict[int, Stream] = {}
        self._close_reason: SessionClosed | None = None
        self._writer = FrameWriter(transport, self._conn, self._after_write)
        #: Set once the writer has flushed and closed the transport.
        self._transport_closed = trio.Event()
        self._control_drained: trio.Event | None = None
        self._accept_waiter: trio.Event | None = None
        self._open_waiter: trio.Event | None = None
        # Streams waiting for room in the send queue, in arrival order (a dict as ordered set).
        self._queue_waiters: dict[Stream, None] = {}
        self._pings: dict[int, trio.Event] = {}
        self._next_ping_id = 0
        self._timers: list[tuple[float, int, int]] = []
        self._timer_wakeup = trio.Event()
        self._last_inbound = 0.0
        self._auto_tune = config.auto_tune_window
        self._ping_started: dict[int, float] = {}

    # -- public API -----------------------------------------------------------------------

    @property
    def num_streams(self) -> int:
        """Streams that are open in at least one direction."""
        return self._conn.num_streams

    @property
    def rtt(self) -> float | None:
        """The latest round-trip time in seconds, from ``ping()`` or keepalive pings."""
        return self._conn.rtt

    @property
    def is_closed(self) -> bool:
        return self._close_reason is not None

    @property
    def close_reason(self) -> SessionClosed | None:
        """``None`` while the session runs; afterwards the error that ended it."""
        return self._close_reason

    async def open_stream(self) -> Stream:
        """Open a new stream. Data may be sent at once, before the peer's ACK.

        Like hashicorp, waits while ``accept_backlog`` streams we opened are still unACKed.

        Raises:
            GoAwayError: a GoAway is in force. SessionClosed: the session has ended.
            StreamsExhausted: no stream ids are left.
        """
        await trio.lowlevel.checkpoint()
        while self._conn.unacked_streams >= self.config.accept_backlog:
            self.raise_if_closed()
            if self._open_waiter is None:
                self._open_waiter = trio.Event()
            await self._open_waiter.wait()
        self.raise_if_closed()
        try:
            stream_id = self._conn.open_stream()
        except GoAwayInForce as exc:
            raise session_error_of(exc) from exc
        stream = self._streams[stream_id] = Stream(self, stream_id)
        if self.config.stream_open_timeout is not None:
            self._add_timer(self.config.stream_open_timeout, _OPEN_TIMER, stream_id)
        self._wake_writer()
        return stream

    async def accept_stream(self) -> Stream:
        """Wait for the next stream the peer opens.

        Raises:
            SessionClosed: the session has ended.
        """
        await trio.lowlevel.checkpoint()
        while True:
            stream_id = self._conn.accept()
            if stream_id is not None:
                stream = self._incoming.pop(stream_id, None)
                if stream is not None:  # else it came in the read that broke the session
                    return stream
                continue
            self.raise_if_closed()
            # Any number of tasks may wait; they share one event and retry when it fires.
            if self._accept_waiter is None:
                self._accept_waiter = trio.Event()
            await self._accept_waiter.wait()

    def __aiter__(self) -> AsyncIterator[Stream]:
        """The streams the peer opens, until the session ends: quietly when it ended cleanly
        (:class:`SessionEnded`), else with the reason (a protocol error, a timeout, a broken
        transport)."""
        return self

    async def __anext__(self) -> Stream:
        try:
            return await self.accept_stream()
        except SessionEnded:
            raise StopAsyncIteration from None

    async def ping(self) -> float:
        """Send a ping and return the round-trip time in seconds."""
        await trio.lowlevel.checkpoint()
        self.raise_if_closed()
        started = trio.current_time()
        opaque = self._send_ping()
        self._pings[opaque] = answered = trio.Event()
        try:
            await answered.wait()
        finally:
            del self._pings[opaque]
        self.raise_if_closed()
        return trio.current_time() - started

    def _send_ping(self) -> int:
        opaque = self._next_ping_id
        self._next_ping_id = (opaque + 1) & 0xFFFFFFFF
        self._ping_started[opaque] = trio.current_time()
        self._conn.ping(opaque)
        self._wake_writer()
        return opaque

    async def go_away(self) -> None:
        """Tell the peer we accept no new streams and open none; existing streams go on."""
        await trio.lowlevel.checkpoint()
        self.raise_if_closed()
        self._conn.go_away()
        self._wake_writer()

    async def aclose(self) -> None:
        """Send GoAway, flush what is queued, close the transport (gracefully: a WebSocket
        transport sends its close frame), all within ``connection_write_timeout``; then, or
        when cancelled, the transport is closed forcefully. Idempotent; any task may call
        it."""
        if self._close_reason is None:
            self._conn.go_away()
            self._terminate(SessionEnded("the session was closed by this side"))
        try:
            with trio.move_on_after(self.config.connection_write_timeout):
                await self._transport_closed.wait()
        finally:
            if not self._transport_closed.is_set():
                await trio.aclose_forcefully(self._transport)

    # -- used by Stream -------------------------------------------------------------------

    def raise_if_closed(self) -> None:
        reason = self._close_reason
        if reason is not None:
            # A fresh instance per raise: one exception object must not be raised by
            # several tasks, and the original keeps its own traceback as the cause.
            raise copy.copy(reason) from reason

    def _wake_writer(self) -> None:
        self._writer.wake()

    def _after_write(self) -> None:
        if self._queue_waiters:
            self._wake_queue_waiters()
        _wake(self._control_drained)

    def queue_data(self, stream: Stream, data: bytes | memoryview) -> int:
        room = WRITE_QUEUE_LIMIT - self._conn.queued_data_bytes
        if room < min(len(data), self.config.max_frame_size):
            # Wait for the writer rather than queue a sliver of a frame.
            self._queue_waiters[stream] = None
            return 0
        sent = self._conn.send_data(stream.stream_id, data, room)
        if sent:
            self._wake_writer()
        return sent

    def send_would_block(self, stream: Stream) -> bool:
        if self._conn.queued_data_bytes >= WRITE_QUEUE_LIMIT:
            self._queue_waiters[stream] = None
            return True
        return self._conn.send_window(stream.stream_id) <= 0

    def _wake_queue_waiters(self) -> None:
        """Wake as many streams, oldest first, as the free room can take."""
        room = WRITE_QUEUE_LIMIT - self._conn.queued_data_bytes
        waiters = self._queue_waiters
        while waiters and room > 0:
            stream = next(iter(waiters))
            del waiters[stream]
            room -= max(self._conn.send_window(stream.stream_id), self.config.max_frame_size)
            stream.window_opened()

    def receivable(self, stream: Stream) -> int:
        return self._conn.receivable(stream.stream_id)

    def consumed(self, stream: Stream, nbytes: int) -> None:
        now = trio.current_time() if self._auto_tune else None
        self._conn.consume(stream.stream_id, nbytes, now)
        if self._conn.has_data_to_send():
            self._wake_writer()

    def close_stream(self, stream: Stream) -> None:
        self._conn.close_stream(stream.stream_id)
        self._after_local_close(stream)

    def abandon_stream(self, stream: Stream) -> None:
        self._conn.abandon_stream(stream.stream_id)
        self._streams.pop(stream.stream_id, None)
        self._after_local_close(stream)

    def _after_local_close(self, stream: Stream) -> None:
        state = self._conn.stream(stream.stream_id)
        if state is None:
            self._streams.pop(stream.stream_id, None)
        elif self.config.stream_close_timeout is not None:
            self._add_timer(self.config.stream_close_timeout, _CLOSE_TIMER, stream.stream_id)
        self._wake_writer()

    def reset_stream(self, stream: Stream) -> None:
        self._conn.reset_stream(stream.stream_id)
        self._streams.pop(stream.stream_id, None)
        self._wake_open_waiter()
        self._wake_writer()

    # -- ending -----------------------------------------------------------------------------

    def _terminate(self, reason: SessionClosed) -> None:
        """End the session: wake every waiter; the writer flushes, then closes."""
        if self._close_reason is not None:
            return
        self._close_reason = reason
        for stream in self._streams.values():
            stream.wake_all()
        for stream in self._incoming.values():
            stream.wake_all()
        for answered in self._pings.values():
            answered.set()
        _wake(self._accept_waiter)
        _wake(self._control_drained)
        self._wake_open_waiter()
        self._writer.close()
        self._timer_wakeup.set()

    def _wake_open_waiter(self) -> None:
        waiter, self._open_waiter = self._open_waiter, None
        _wake(waiter)

    # -- background tasks -------------------------------------------------------------------

    async def _run_reader(self) -> None:
        receive = self._transport.receive_some
        feed = self._conn.receive_data
        try:
            while self._close_reason is None:
                data = await receive(RECEIVE_SIZE)
                self._last_inbound = trio.current_time()
                if not data:
                    self._terminate(SessionEnded("the peer closed the connection"))
                    return
                events = feed(data)
                if events:
                    self._dispatch(events)
                if self._open_waiter is not None and (
                    self._conn.unacked_streams < self.config.accept_backlog
                ):
                    # An unACKed stream may have gone without an event of its own (an
                    # RST for one we had abandoned): let blocked openers retry.
                    self._wake_open_waiter()
                if self._conn.has_data_to_send():
                    self._wake_writer()
                    while (
                        self._conn.queued_control_frames > CONTROL_QUEUE_LIMIT
                        and self._close_reason is None
                    ):
                        self._control_drained = drained = trio.Event()
                        await drained.wait()
        except ProtocolViolation as exc:  # the core has queued GoAway(protocol error)
            self._terminate(session_error_of(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            reason = SessionClosed(f"the transport failed: {exc!r}")
            reason.__cause__ = exc
            self._terminate(reason)

    def _dispatch(self, events: list[Event]) -> None:
        streams = self._streams
        for event in events:
            match event:
                case DataReceived(stream_id=stream_id, data=data):
                    stream = streams.get(stream_id)
                    if stream is None:  # closed by us meanwhile: give the credit back
                        self._conn.consume(stream_id, len(data))
                    else:
                        stream.data_received(data)
                case WindowUpdated(stream_id=stream_id):
                    if (stream := streams.get(stream_id)) is not None:
                        stream.window_opened()
                case StreamOpened(stream_id=stream_id):
                    streams[stream_id] = self._incoming[stream_id] = Stream(self, stream_id)
                    _wake(self._accept_waiter)
                    self._accept_waiter = None
                case StreamEnded(stream_id=stream_id):
                    if (stream := streams.get(stream_id)) is not None:
                        stream.end_received()
                        # Decide by the stream's own flags: the core may already have moved
                        # on (an RST later in the same read), and that event must still
                        # reach it.
                        if stream.send_closed:
                            del streams[stream_id]
                case ResetReceived(stream_id=stream_id):
                    if (stream := streams.pop(stream_id, None)) is not None:
                        stream.reset_received()
                    self._wake_open_waiter()
                case StreamAcked():
                    self._wake_open_waiter()
                case PongReceived(opaque=opaque):
                    started = self._ping_started.pop(opaque, None)
                    if started is not None:
                        self._conn.rtt = trio.current_time() - started
                    answered = self._pings.get(opaque)
                    if answered is not None:
                        answered.set()
                case GoAwayReceived(code=code):
                    if code:
                        self._terminate(GoAwayError(f"the peer sent GoAway({code})", code))
                    else:
                        self._wake_open_waiter()

    async def _run_writer(self) -> None:
        """The writer task; once the session has ended and its last frames (a GoAway) are
        out, it closes the transport -- gracefully and bounded, so that the transport's own
        goodbye (a WebSocket close frame) follows them."""
        try:
            failure = await self._writer.run()
            if failure is not None:
                self._terminate(failure)
        finally:
            try:
                with trio.move_on_after(self.config.connection_write_timeout):
                    # Closed even if cut short or cancelled (trio's contract for aclose).
                    await self._transport.aclose()
            finally:
                self._transport_closed.set()

    def _add_timer(self, delay: float, kind: int, stream_id: int) -> None:
        timers = self._timers
        if len(timers) > 2 * self._conn.num_streams + 1024:
            # Entries outlive their streams (a stream ACKed or closed in a millisecond
            # leaves a 75 s or 5 min entry): drop those of streams that are gone, so the
            # heap follows the live streams, not the churn.
            timers[:] = [entry for entry in timers if self._conn.stream(entry[2]) is not None]
            heapq.heapify(timers)
        deadline = trio.current_time() + delay
        if not self._timers or deadline < self._timers[0][0]:
            self._timer_wakeup.set()
        heapq.heappush(self._timers, (deadline, kind, stream_id))

    async def _run_timers(self) -> None:
        config = self.config
        if config.auto_tune_window:
            self._send_ping()  # auto-tuning needs an RTT from the start
        keepalive_at = math.inf
        if config.enable_keepalive:
            keepalive_at = trio.current_time() + config.keepalive_interval
        ping_sent_at = math.inf
        write_timeout = config.connection_write_timeout
        while self._close_reason is None:
            # Waking every write timeout finds a hung write within twice the timeout,
            # without a cancel scope (and its cost) around every single write.
            deadline = min(
                keepalive_at,
                ping_sent_at + config.ping_timeout,
                trio.current_time() + write_timeout,
            )
            if self._timers:
                deadline = min(deadline, self._timers[0][0])
            self._timer_wakeup = trio.Event()
            with trio.move_on_at(deadline):
                await self._timer_wakeup.wait()
            now = trio.current_time()
            if now >= self._writer.started + write_timeout:
                self._writer.scope.cancel()
                return
            if ping_sent_at <= self._last_inbound:
                ping_sent_at = math.inf  # any frame from the peer proves it is alive
            elif now >= ping_sent_at + config.ping_timeout:
                self._terminate(KeepAliveTimeout("the peer did not answer a keepalive ping"))
                return
            if now >= keepalive_at:
                keepalive_at = now + config.keepalive_interval
                if ping_sent_at == math.inf:
                    ping_sent_at = now
                    self._ping_started.clear()  # unanswered pings are not waited for
                    self._send_ping()
            while self._timers and self._timers[0][0] <= now:
                _, kind, stream_id = heapq.heappop(self._timers)
                self._stream_timer_expired(kind, stream_id)

    def _stream_timer_expired(self, kind: int, stream_id: int) -> None:
        state = self._conn.stream(stream_id)
        if state is None:
            return
        if kind == _OPEN_TIMER and not state.acked:
            self._terminate(SessionTimeout(f"stream {stream_id} was not acknowledged in time"))
        elif kind == _CLOSE_TIMER and not state.remote_closed:
            # The peer never half-closed after our FIN: free the stream (hashicorp does too).
            stream = self._streams.pop(stream_id, None)
            self._conn.reset_stream(stream_id)
            if stream is not None:
                stream.reset_received()
            self._wake_open_waiter()  # it may have been one of the unACKed
            self._wake_writer()
