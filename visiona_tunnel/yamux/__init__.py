"""yamux for trio: a sans-IO core and a trio session, wire-compatible with hashicorp/yamux.

async with open_session(transport, client=True) as session:
    stream = await session.open_stream()
    await stream.send_all(b"hello")
"""

from .config import INITIAL_STREAM_WINDOW, Config
from .connection import YamuxConnection
from .core_errors import GoAwayInForce, ProtocolViolation
from .errors import (
    GoAwayError,
    KeepAliveTimeout,
    ProtocolError,
    SessionClosed,
    SessionEnded,
    SessionTimeout,
    StreamReset,
    StreamsExhausted,
    YamuxError,
)
from .frames import Flag, FrameType, GoAwayCode, Header
from .session import Session, open_session
from .stream import Stream

__all__ = [
    "INITIAL_STREAM_WINDOW",
    "Config",
    "Flag",
    "FrameType",
    "GoAwayCode",
    "GoAwayError",
    "GoAwayInForce",
    "Header",
    "KeepAliveTimeout",
    "ProtocolError",
    "ProtocolViolation",
    "Session",
    "SessionClosed",
    "SessionEnded",
    "SessionTimeout",
    "Stream",
    "StreamReset",
    "StreamsExhausted",
    "YamuxConnection",
    "YamuxError",
    "open_session",
]
