"""What the peer did: the events ``YamuxConnection.receive_data`` returns.

Plain immutable values; the driver dispatches on their type.
"""

from __future__ import annotations

from typing import TypeAlias

import attrs


@attrs.frozen
class StreamOpened:
    """The peer opened a stream; it is ACKed and waits in the accept backlog."""

    stream_id: int


@attrs.frozen
class DataReceived:
    """Payload for a stream. Pass its length to ``consume`` once the application has it."""

    stream_id: int
    data: bytes


@attrs.frozen
class StreamEnded:
    """The peer half-closed the stream (FIN): no more data will arrive on it."""

    stream_id: int


@attrs.frozen
class ResetReceived:
    """The peer reset the stream (RST). The stream is gone."""

    stream_id: int


@attrs.frozen
class StreamAcked:
    """The peer acknowledged a stream we opened."""

    stream_id: int


@attrs.frozen
class WindowUpdated:
    """The peer granted more send credit on a stream."""

    stream_id: int


@attrs.frozen
class PongReceived:
    """The peer answered our ping ``opaque``. (Pings *to* us are answered automatically.)"""

    opaque: int


@attrs.frozen
class GoAwayReceived:
    """The peer will accept no new streams. A non-zero ``code`` also ends the session."""

    code: int


Event: TypeAlias = (
    StreamOpened
    | DataReceived
    | StreamEnded
    | ResetReceived
    | StreamAcked
    | WindowUpdated
    | PongReceived
    | GoAwayReceived
)

__all__ = [
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "PongReceived",
    "ResetReceived",
    "StreamAcked",
    "StreamEnded",
    "StreamOpened",
    "WindowUpdated",
]
