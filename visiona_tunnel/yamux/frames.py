"""The yamux frame header: wire numbers and the 12-byte codec.

Every frame starts with ``version(u8) type(u8) flags(u16) stream_id(u32) length(u32)``,
big-endian. Only Data frames have a body; for the other types ``length`` is a value
(a window delta, a ping's opaque number, a GoAway code). This module knows bytes only.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

VERSION = 0
HEADER_SIZE = 12
#: The largest stream id; hashicorp refuses to open one at or past 2**32 - 2.
MAX_STREAM_ID = 2**32 - 1

_HEADER = struct.Struct("!BBHII")
pack_header = _HEADER.pack
unpack_header_from = _HEADER.unpack_from


class FrameType(enum.IntEnum):
    #: Payload bytes for a stream; ``length`` is the body size.
    DATA = 0
    #: Adds ``length`` to the receiver's send window of a stream.
    WINDOW_UPDATE = 1
    #: SYN asks, ACK answers with the same opaque ``length``; stream id 0.
    PING = 2
    #: The sender will open no more streams; ``length`` is a :class:`GoAwayCode`.
    GO_AWAY = 3


class Flag(enum.IntFlag):
    NONE = 0
    #: Opens a stream (or asks a ping).
    SYN = 1
    #: Acknowledges a stream (or answers a ping).
    ACK = 2
    #: Half-closes the sender's direction of a stream.
    FIN = 4
    #: Resets a stream at once.
    RST = 8


class GoAwayCode(enum.IntEnum):
    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class Header(NamedTuple):
    """A decoded frame header."""

    version: int
    type: int
    flags: int
    stream_id: int
    length: int

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> Header:
        """Decode the 12 bytes at ``offset`` without checking them."""
        return cls._make(unpack_header_from(data, offset))

    def encode(self) -> bytes:
        return pack_header(self.version, self.type, self.flags, self.stream_id, self.length)


def encode_header(
    type: FrameType, flags: int, stream_id: int, length: int, *, version: int = VERSION
) -> bytes:
    """The 12 header bytes of one frame."""
    return pack_header(version, type, flags, stream_id, length)
