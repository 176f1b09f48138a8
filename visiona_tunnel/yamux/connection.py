"""The yamux protocol as a pure state machine (sans-IO).

``YamuxConnection`` turns received bytes into events (``receive_data``) and the caller's
intentions (``open_stream``, ``send_data``, ``close_stream``, ...) into queued frames that
``data_to_send`` hands out. It never reads a clock, starts a task or touches a socket; the
trio driver in ``session.py`` does all of that.

Behaviour follows hashicorp/yamux (see ``docs/yamux-wire.md``):

* Frames are dispatched on (type, flags): SYN opens, ACK acknowledges, FIN half-closes, RST
  resets; the flags are processed before a Data body, as Go does. WindowUpdate has no body.
* A Data length beyond the stream's receive window is a protocol error, found from the
  header alone, before any of the body is buffered.
* Receive credit is returned as the application *consumes* data (``consume``), once at least
  half of the window has been used, so a stream never buffers more than its window.
* An inbound stream is ACKed the moment it enters the accept backlog; a full backlog answers
  RST. Data for an unknown stream is drained; other frames for it are ignored.
* Control frames (window updates, pings, ACK, RST, GoAway) are sent before queued data. FIN
  travels in the data queue, behind the stream's own data.
"""

from __future__ import annotations

from collections import deque
from typing import TypeAlias

import attrs

from .config import INITIAL_STREAM_WINDOW, Config
from .core_errors import GoAwayInForce, ProtocolViolation, StreamsExhausted
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
from .frames import HEADER_SIZE, MAX_STREAM_ID, Flag, FrameType, GoAwayCode, pack_header
from .frames import unpack_header_from as _unpack

_DATA = FrameType.DATA.value
_WINDOW_UPDATE = FrameType.WINDOW_UPDATE.value
_PING = FrameType.PING.value
_GO_AWAY = FrameType.GO_AWAY.value
_SYN = Flag.SYN.value
_ACK = Flag.ACK.value
_FIN = Flag.FIN.value
_RST = Flag.RST.value


@attrs.define(slots=True, eq=False)
class StreamState:
    """Protocol state of one live stream (both directions)."""

    stream_id: int
    #: How many bytes we may still send before the peer grants more.
    send_window: int
    #: How many bytes the peer may still send us.
    recv_window: int
    #: The window we aim to offer (grows with auto-tuning).
    recv_window_max: int
    #: Bytes received but not yet consumed by the application.
    unread: int = 0
    #: For streams we opened: the peer's ACK has arrived.
    acked: bool = True
    #: We sent (queued) FIN.
    local_closed: bool = False
    #: The peer sent FIN.
    remote_closed: bool = False
    #: The application closed the stream: incoming data is answered with RST.
    abandoned: bool = False
    #: Reset (either way): queued frames for it are dropped.
    reset: bool = False
    #: When credit was last returned (auto-tuning only).
    window_epoch: float = 0.0


_Queued: TypeAlias = tuple[StreamState, bytes, bytes | memoryview | None]


class YamuxConnection:
    """One side of a yamux session, without I/O.

    Args:
        client: ``True`` for the side that opens odd stream ids.
        config: the session's :class:`Config`.

    Feed every byte received from the transport to :meth:`receive_data` (``b""`` at EOF) and
    handle the events it returns; send whatever :meth:`data_to_send` returns, in order.
    """

    def __init__(self, *, client: bool, config: Config | None = None) -> None:
        self.config = config = config or Config()
        self.client = client
        self._streams: dict[int, StreamState] = {}
        self._next_id = 1 if client else 2
        self._backlog: deque[int] = deque()
        self._unacked = 0
        self._window = (
            INITIAL_STREAM_WINDOW if config.auto_tune_window else (config.max_stream_window_size)
        )
        # Outbound: control frames first, then (stream, header, body) in order.
        self._control: list[bytes | memoryview] = []
        self._data: deque[_Queued] = deque()
        self._queued_data = 0
        # Inbound parser state: a partial header, or the rest of a Data body.
        self._partial = b""
        self._body_left = 0
        self._body_stream: StreamState | None = None
        self._body_fin = False
        self.local_go_away = False
        self.remote_go_away = False
        #: Set once the session is over (protocol error, error GoAway, EOF).
        self.terminated = False
        #: The latest round-trip time measured by the driver (used by auto-tuning).
        self.rtt: float | None = None

    # -- introspection ------------------------------------------------------------------

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    @property
    def unacked_streams(self) -> int:
        """Streams we opened that the peer has not ACKed yet."""
        return self._unacked

    @property
    def queued_data_bytes(self) -> int:
        """Data payload bytes waiting in the send queue."""
        return self._queued_data

    @property
    def queued_control_frames(self) -> int:
        """Control frames (pongs, window updates, ACK, RST, GoAway) waiting to be sent."""
        return len(self._control)

    def stream(self, stream_id: int) -> StreamState | None:
        return self._streams.get(stream_id)

    def send_window(self, stream_id: int) -> int:
        state = self._streams.get(stream_id)
        return state.send_window if state is not None else 0

    def receivable(self, stream_id: int) -> int:
        """How many more bytes the peer may send on the stream before it needs more credit
        from us: what is left of its window, and the rest of a frame still arriving."""
        state = self._streams.get(stream_id)
        if state is None or state.remote_closed:
            return 0
        in_flight = self._body_left if self._body_stream is state else 0
        return state.recv_window + in_flight

    def has_data_to_send(self) -> bool:
        return bool(self._control or self._data)

    # -- receiving ----------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse received bytes; ``b""`` means the transport reached EOF.

        Raises:
            ProtocolViolation: the peer broke the protocol. A GoAway(protocol error) is queued;
                send it, then close the transport.
        """
        if self.terminated:
            return []
        if not data:
            self.terminated = True
            return []
        if type(data) is not bytes:
            data = bytes(data)
        events: list[Event] = []
        pos = 0
        if self._body_left:
            pos = self._continue_body(data, 0, events)
        if self._partial and pos < len(data):
            # Only a header (12 bytes) is ever held back; bodies are passed on as they come.
            data = self._partial + data[pos:]
            self._partial = b""
            pos = 0
        end = len(data)
        while pos < end:
            if end - pos < HEADER_SIZE:
                self._partial = data[pos:]
                break
            version, type_, flags, stream_id, length = _unpack(data, pos)
            pos += HEADER_SIZE
            if version != 0:
                raise self._protocol_error(f"unsupported yamux version {version}")
            if type_ == _DATA:
                state = (
                    self._stream_flags(flags, stream_id, events)
                    if flags
                    else (self._streams.get(stream_id))
                )
                self._start_body(state, stream_id, flags, length)
                if self._body_left:
                    pos = self._continue_body(data, pos, events)
                elif self._body_fin:
                    self._end_body(events)
            elif type_ == _WINDOW_UPDATE:
                state = (
                    self._stream_flags(flags, stream_id, events)
                    if flags
                    else (self._streams.get(stream_id))
                )
                if state is not None:
                    if flags & _FIN:
                        events.append(StreamEnded(stream_id))
                        self._maybe_forget(state)
                    if length:
                        state.send_window += length
                        events.append(WindowUpdated(stream_id))
            elif type_ == _PING:
                if flags & _SYN:
                    self._control.append(pack_header(0, _PING, _ACK, 0, length))
                elif flags & _ACK:
                    events.append(PongReceived(length))
            elif type_ == _GO_AWAY:
                events.append(GoAwayReceived(length))
                if length == GoAwayCode.NORMAL:
                    self.remote_go_away = True
                else:
                    self.remote_go_away = True
                    self.terminated = True
                    break
            else:
                raise self._protocol_error(f"unknown frame type {type_}")
        return events

    def _stream_flags(self, flags: int, stream_id: int, events: list[Event]) -> StreamState | None:
        """Apply SYN/ACK/RST (and validate FIN) as hashicorp's processFlags does."""
        if flags & _SYN:
            self._incoming_stream(stream_id, events)
        state = self._streams.get(stream_id)
        if state is None:
            return None
        if flags & _ACK and not state.acked:
            state.acked = True
            self._unacked -= 1
            events.append(StreamAcked(stream_id))
        if flags & _FIN:
            if state.remote_closed:
                raise self._protocol_error(f"second FIN on stream {stream_id}")
            state.remote_closed = True
        if flags & _RST:
            self._forget(state, reset=True)
            if not state.abandoned:
                events.append(ResetReceived(stream_id))
            return None
        return state

    def _incoming_stream(self, stream_id: int, events: list[Event]) -> None:
        if stream_id == 0 or (stream_id % 2 == 1) == self.client:
            raise self._protocol_error(f"peer opened stream {stream_id} with our parity")
        if stream_id in self._streams:
            raise self._protocol_error(f"duplicate stream {stream_id}")
        if self.local_go_away or len(self._backlog) >= self.config.accept_backlog:
            self._control.append(pack_header(0, _WINDOW_UPDATE, _RST, stream_id, 0))
            return
        window = self._window
        self._streams[stream_id] = StreamState(stream_id, INITIAL_STREAM_WINDOW, window, window)
        self._backlog.append(stream_id)
        # ACK at once: a hashicorp opener ends the session after 75 s without one.
        self._control.append(
            pack_header(0, _WINDOW_UPDATE, _ACK, stream_id, window - INITIAL_STREAM_WINDOW)
        )
        events.append(StreamOpened(stream_id))

    def _start_body(
        self, state: StreamState | None, stream_id: int, flags: int, length: int
    ) -> None:
        self._body_fin = state is not None and bool(flags & _FIN)
        if state is not None and state.remote_closed and not self._body_fin:
            state = None  # data after the peer's FIN: drained, as for an unknown stream
        if state is not None and length:
            if length > state.recv_window:
                raise self._protocol_error(
                    f"stream {stream_id} sent {length} bytes into a window of {state.recv_window}"
                )
            state.recv_window -= length
            if state.abandoned:
                # The application closed this stream: tell the peer to stop, drop the data.
                self._control.append(pack_header(0, _WINDOW_UPDATE, _RST, stream_id, 0))
                self._forget(state, reset=True)
                state = None
        self._body_stream = state
        self._body_left = length

    def _continue_body(self, data: bytes, pos: int, events: list[Event]) -> int:
        take = min(self._body_left, len(data) - pos)
        if not take:  # the header ended this read; the body comes with the next one
            return pos
        state = self._body_stream
        # Reset or abandoned mid-frame: the rest of the body is dropped (its credit was
        # charged at the header; abandon_stream already returned it).
        if state is not None and not state.reset and not state.abandoned:
            chunk = data if take == len(data) else data[pos : pos + take]
            state.unread += take
            events.append(DataReceived(state.stream_id, chunk))
        self._body_left -= take
        if not self._body_left and self._body_fin:
            self._end_body(events)
        return pos + take

    def _end_body(self, events: list[Event]) -> None:
        state = self._body_stream
        self._body_fin = False
        if state is not None and not state.reset:
            events.append(StreamEnded(state.stream_id))
            self._maybe_forget(state)

    def _protocol_error(self, message: str) -> ProtocolViolation:
        # Sent even after a normal GoAway of ours: the peer must learn why we hang up.
        self.local_go_away = True
        self._control.append(pack_header(0, _GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR))
        self.terminated = True
        return ProtocolViolation(message)

    # -- the application's side ---------------------------------------------------------

    def open_stream(self) -> int:
        """Queue a SYN for a new stream and return its id.

        Raises:
            GoAwayInForce: a GoAway (ours or the peer's) is in force.
            StreamsExhausted: every id of our parity has been used.
        """
        if self.local_go_away or self.remote_go_away:
            raise GoAwayInForce("a GoAway is in force", remote=self.remote_go_away)
        stream_id = self._next_id
        if stream_id >= MAX_STREAM_ID - 1:
            raise StreamsExhausted("no stream ids left on this session")
        self._next_id += 2
        window = self._window
        state = StreamState(stream_id, INITIAL_STREAM_WINDOW, window, window, acked=False)
        self._streams[stream_id] = state
        self._unacked += 1
        self._control.append(
            pack_header(0, _WINDOW_UPDATE, _SYN, stream_id, window - INITIAL_STREAM_WINDOW)
        )
        return stream_id

    def accept(self) -> int | None:
        """Take the oldest stream from the accept backlog, if any."""
        return self._backlog.popleft() if self._backlog else None

    def send_data(self, stream_id: int, data: bytes | memoryview, limit: int) -> int:
        """Queue up to ``limit`` bytes of ``data`` as Data frames, within the send window.

        ``data`` is referenced, not copied: it must not change until it has been sent.
        Returns how many bytes were queued (0 if the window or ``limit`` is used up).
        """
        state = self._streams[stream_id]
        if state.local_closed:
            raise RuntimeError(f"stream {stream_id} is closed for sending")
        n = min(len(data), state.send_window, limit)
        if n <= 0:
            return 0
        state.send_window -= n
        frame = self.config.max_frame_size
        queue = self._data.append
        if n == len(data) and n <= frame:
            queue((state, pack_header(0, _DATA, 0, stream_id, n), data))
            self._queued_data += n
            return n
        for start in range(0, n, frame):
            body = data[start : min(start + frame, n)]
            queue((state, pack_header(0, _DATA, 0, stream_id, len(body)), body))
        self._queued_data += n
        return n

    def consume(self, stream_id: int, nbytes: int, now: float | None = None) -> None:
        """The application has taken ``nbytes`` of received data: return credit if due.

        With ``Config.auto_tune_window``, pass the current time as ``now``.
        """
        state = self._streams.get(stream_id)
        if state is None:
            return
        state.unread -= nbytes
        if state.remote_closed:
            return
        # The rest of a frame still arriving was charged to the window at its header.
        in_flight = self._body_left if self._body_stream is state else 0
        delta = state.recv_window_max - state.unread - in_flight - state.recv_window
        # As hashicorp: only once at least half of the window has been consumed.
        if delta >= state.recv_window_max // 2:
            if now is not None and self.config.auto_tune_window:
                delta += self._tune_window(state, now)
            state.recv_window += delta
            self._control.append(pack_header(0, _WINDOW_UPDATE, 0, stream_id, delta))

    def _tune_window(self, state: StreamState, now: float) -> int:
        """Double the window if the reader used up half of it within a few RTTs.

        The allowance grows with the window (go-yamux#136: a fixed 4 x RTT stalls growth
        near 512 KiB), so any stream that keeps the window busy grows to the maximum.
        """
        cap = self.config.max_stream_window_size
        current = state.recv_window_max
        fast = self.rtt is not None and now - state.window_epoch < 4 * self.rtt * (
            current / INITIAL_STREAM_WINDOW
        )
        state.window_epoch = now
        if not fast or current >= cap:
            return 0
        state.recv_window_max = min(2 * current, cap)
        return state.recv_window_max - current

    def close_stream(self, stream_id: int) -> None:
        """Half-close our direction (FIN, behind the stream's queued data). Idempotent."""
        state = self._streams.get(stream_id)
        if state is None or state.local_closed:
            return
        state.local_closed = True
        self._data.append((state, pack_header(0, _WINDOW_UPDATE, _FIN, stream_id, 0), None))
        self._maybe_forget(state)

    def abandon_stream(self, stream_id: int) -> None:
        """The application closed the stream: FIN if not sent, and RST any later data."""
        state = self._streams.get(stream_id)
        if state is None:
            return
        state.abandoned = True
        state.unread = 0
        delta = state.recv_window_max - state.recv_window
        if delta and not state.remote_closed:
            # Unblock a peer stuck on a full window: its next Data frame then gets our RST.
            state.recv_window += delta
            self._control.append(pack_header(0, _WINDOW_UPDATE, 0, stream_id, delta))
        self.close_stream(stream_id)

    def reset_stream(self, stream_id: int) -> None:
        """Send RST and forget the stream; its queued data is dropped."""
        state = self._streams.get(stream_id)
        if state is None:
            return
        self._forget(state, reset=True)
        self._control.append(pack_header(0, _WINDOW_UPDATE, _RST, stream_id, 0))

    def ping(self, opaque: int) -> None:
        self._control.append(pack_header(0, _PING, _SYN, 0, opaque & 0xFFFFFFFF))

    def go_away(self, code: GoAwayCode = GoAwayCode.NORMAL) -> None:
        """Queue a GoAway; from now on inbound SYNs are answered with RST. Idempotent."""
        if not self.local_go_away:
            self.local_go_away = True
            self._control.append(pack_header(0, _GO_AWAY, 0, 0, code))

    def data_to_send(self, limit: int = 1 << 20) -> bytes:
        """All queued control frames, then queued data up to about ``limit`` bytes."""
        parts = self.frames_to_send(limit)
        if len(parts) == 1 and type(parts[0]) is bytes:
            return parts[0]
        return b"".join(parts)

    def frames_to_send(self, limit: int = 1 << 20) -> list[bytes | memoryview]:
        """Like :meth:`data_to_send`, as a list of buffers for a vectored write."""
        parts = self._control
        self._control = []
        queue = self._data
        taken = 0
        while queue and taken < limit:
            state, header, body = queue.popleft()
            if body is None:
                if not state.reset:
                    parts.append(header)
                continue
            self._queued_data -= len(body)
            if state.reset:
                continue
            taken += len(body)
            parts.append(header)
            parts.append(body)
        return parts

    # -- bookkeeping ----------------------------------------------------------------------

    def _maybe_forget(self, state: StreamState) -> None:
        if state.local_closed and state.remote_closed:
            self._forget(state)

    def _forget(self, state: StreamState, *, reset: bool = False) -> None:
        state.reset = state.reset or reset
        if self._streams.pop(state.stream_id, None) is None:
            return
        if not state.acked:
            state.acked = True
            self._unacked -= 1


__all__ = ["StreamState", "YamuxConnection"]
