"""Reading WebSocket frames after the handshake: wsproto's rules, at the speed a tunnel needs.

:class:`FrameReader` is sans-IO: ``receive_data(bytes)`` in, wsproto's own event objects out
(:class:`~wsproto.events.BytesMessage`, ``TextMessage``, ``Ping``, ``Pong``,
``CloseConnection``), **the same events wsproto's** ``Connection`` **gives for the same
bytes** -- the same payloads in the same pieces, message boundaries, close codes and
reasons, and a ``CloseConnection`` with the code and message of the ``ParseFailed`` that
wsproto would raise at the same byte (a differential hypothesis test holds this, on valid,
fragmented, split and malformed input). After a close frame or a failure it reads nothing
more.

Why: an agent on gorilla's defaults (the seed's) sends every yamux body as 4 KiB frames.
wsproto parses each through several layers of objects and copies (its buffer, the frame,
the message decoder), and that was most of the relay's time. Here a frame is a few index
operations on one buffer, one C unmask (websockets' ``apply_mask``), one ``bytes`` copy.
wsproto keeps the handshake and everything we send.
"""

from __future__ import annotations

import codecs
import contextlib
import struct
from collections.abc import Callable, Iterator

from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage
from wsproto.frame_protocol import (
    LOCAL_ONLY_CLOSE_REASONS,
    MAX_CLOSE_REASON,
    MAX_PAYLOAD_NORMAL,
    MAX_PAYLOAD_TWO_BYTE,
    MAX_PROTOCOL_CLOSE_REASON,
    MIN_CLOSE_REASON,
    CloseReason,
    Opcode,
    ParseFailed,
)

__all__ = ["FrameReader"]

_CONTINUATION, _TEXT, _BINARY = Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY
_CLOSE, _PING, _PONG = Opcode.CLOSE, Opcode.PING, Opcode.PONG
_OPCODES = {int(opcode): opcode for opcode in Opcode}
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
#: Compact the buffer once this much of it has been read.
_COMPACT_AT = 1 << 20

Mask = Callable[[bytes | bytearray | memoryview, bytes], bytes]


class FrameReader:
    """The frames of one connection, as wsproto events (see the module docstring).

    ``client``: this side is the client (frames must arrive unmasked), else the server
    (they must arrive masked). ``apply_mask``: ``(data, 4-byte key) -> unmasked``.
    """

    def __init__(self, *, client: bool, apply_mask: Mask) -> None:
        self._client = client
        self._apply_mask = apply_mask
        self._buffer = bytearray()
        self._pos = 0
        #: The frame being read: its opcode for its next piece (None between frames),
        #: FIN bit, payload length and what is still to come, and mask key.
        self._opcode: Opcode | None = None
        self._fin = False
        self._length = 0
        self._remaining = 0
        self._key: bytes | None = None
        #: The message being read (wsproto's MessageDecoder): its opcode, and the UTF-8
        #: decoder of a text message.
        self._message: Opcode | None = None
        self._text: codecs.IncrementalDecoder | None = None
        #: Set after a close frame or a failure: nothing more is read.
        self.done = False
        #: The failure (code, reason), when the last event was one.
        self.failure: tuple[int, str] | None = None

    def receive_data(self, data: bytes | bytearray) -> None:
        if not self.done:  # after a close or a failure wsproto reads nothing more either
            self._buffer += data

    def events(self) -> Iterator[Event]:
        """What the bytes received so far make, in order; stops at the end of the bytes."""
        if self.done:
            return
        try:
            while (event := self._next()) is not None:
                yield event
                if self.done:  # a close frame
                    return
        except ParseFailed as exc:
            self.done = True
            self.failure = (exc.code, str(exc))
            yield CloseConnection(code=exc.code, reason=str(exc))
        finally:
            if self._pos >= _COMPACT_AT or self._pos == len(self._buffer):
                del self._buffer[: self._pos]
                self._pos = 0

    # -- one piece at a time ----------------------------------------------------------------

    def _next(self) -> Event | None:
        if self._opcode is None and not self._read_header():
            return None
        opcode = self._opcode
        assert opcode is not None
        buffer, pos = self._buffer, self._pos
        available = len(buffer) - pos
        if opcode & 0x08:  # a control frame comes whole
            if available < self._remaining:
                return None
            payload = self._payload(pos, self._remaining)
            self._end_frame()
            return self._control(opcode, payload)
        take = self._remaining if available >= self._remaining else available
        if not take and self._length:
            return None
        payload = self._payload(pos, take)
        self._remaining -= take
        frame_finished = not self._remaining
        fin = self._fin
        if frame_finished:
            self._end_frame()
        else:
            self._opcode = _CONTINUATION
        return self._data(opcode, payload, frame_finished, fin)

    def _payload(self, pos: int, size: int) -> bytes:
        """``size`` bytes from ``pos``, unmasked, continuing the frame's mask."""
        self._pos = pos + size
        if self._key is None:
            return bytes(self._buffer[pos : pos + size])
        offset = (self._length - self._remaining) % 4
        key = self._key[offset:] + self._key[:offset] if offset else self._key
        return self._apply_mask(memoryview(self._buffer)[pos : pos + size], key)

    def _end_frame(self) -> None:
        self._opcode = None
        self._key = None

    def _read_header(self) -> bool:
        """Parse the next frame's header, in wsproto's order of checks; False if more
        bytes are needed (nothing is consumed then)."""
        buffer, pos = self._buffer, self._pos
        available = len(buffer) - pos
        if available < 2:
            return False
        first, second = buffer[pos], buffer[pos + 1]
        fin = bool(first & 0x80)
        opcode = _OPCODES.get(first & 0x0F)
        if opcode is None:
            raise ParseFailed(f"Invalid opcode {first & 0x0F:#x}")
        control = bool(opcode & 0x08)
        if control and not fin:
            raise ParseFailed("Invalid attempt to fragment control frame")
        length = second & 0x7F
        if control and length > MAX_PAYLOAD_NORMAL:
            raise ParseFailed("Control frame with payload len > 125")
        size = 2
        if length == 126:
            if available < 4:
                return False
            (length,) = _U16.unpack_from(buffer, pos + 2)
            size = 4
            if length <= MAX_PAYLOAD_NORMAL:
                raise ParseFailed("Payload length used 2 bytes when 1 would have sufficed")
        elif length == 127:
            if available < 10:
                return False
            (length,) = _U64.unpack_from(buffer, pos + 2)
            size = 10
            if length <= MAX_PAYLOAD_TWO_BYTE:
                raise ParseFailed("Payload length used 8 bytes when 2 would have sufficed")
            if length >> 63:
                raise ParseFailed("8-byte payload length with non-zero MSB")
        if first & 0x70:
            raise ParseFailed("Reserved bit set unexpectedly")
        masked = bool(second & 0x80)
        if masked and self._client:
            raise ParseFailed("client received unexpected masked frame")
        if not masked and not self._client:
            raise ParseFailed("server received unexpected unmasked frame")
        key = None
        if masked:
            if available < size + 4:
                return False
            key = bytes(buffer[pos + size : pos + size + 4])
            size += 4
        self._pos = pos + size
        self._opcode, self._fin, self._key = opcode, fin, key
        self._length = self._remaining = length
        return True

    # -- what a piece makes -------------------------------------------------------------

    def _data(self, opcode: Opcode, payload: bytes, frame_finished: bool, fin: bool) -> Event:
        """wsproto's MessageDecoder, then its events."""
        if self._message is None:
            if opcode is _CONTINUATION:
                raise ParseFailed("unexpected CONTINUATION")
            self._message = opcode
        elif opcode is not _CONTINUATION:
            raise ParseFailed(f"expected CONTINUATION, got {opcode!r}")
        if opcode is _TEXT:
            self._text = codecs.getincrementaldecoder("utf-8")()
        finished = frame_finished and fin
        message = self._message
        if finished:
            self._message = None
        if message is _BINARY:
            return BytesMessage(
                data=payload, frame_finished=frame_finished, message_finished=finished
            )
        decoder = self._text
        assert decoder is not None
        if finished:
            self._text = None
        try:
            text = decoder.decode(payload, finished)
        except UnicodeDecodeError as exc:
            raise ParseFailed(str(exc), CloseReason.INVALID_FRAME_PAYLOAD_DATA) from None
        return TextMessage(data=text, frame_finished=frame_finished, message_finished=finished)

    def _control(self, opcode: Opcode, payload: bytes) -> Event:
        if opcode is _PING:
            return Ping(payload=payload)
        if opcode is _PONG:
            return Pong(payload=payload)
        code, reason = _close_payload(payload)
        self.done = True
        return CloseConnection(code=code, reason=reason)


def _close_payload(data: bytes) -> tuple[int, str]:
    """A close frame's code and reason, checked as wsproto checks them."""
    if not data:
        return CloseReason.NO_STATUS_RCVD, ""
    if len(data) == 1:
        raise ParseFailed("CLOSE with 1 byte payload")
    (number,) = _U16.unpack_from(data)
    if number < MIN_CLOSE_REASON or number > MAX_CLOSE_REASON:
        raise ParseFailed("CLOSE with invalid code")
    code: int = number
    with contextlib.suppress(ValueError):  # a code wsproto knows becomes its CloseReason
        code = CloseReason(number)
    if code in LOCAL_ONLY_CLOSE_REASONS:
        raise ParseFailed("remote CLOSE with local-only reason")
    if not isinstance(code, CloseReason) and code <= MAX_PROTOCOL_CLOSE_REASON:
        raise ParseFailed("CLOSE with unknown reserved code")
    try:
        reason = data[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseFailed(
            "Error decoding CLOSE reason: " + str(exc), CloseReason.INVALID_FRAME_PAYLOAD_DATA
        ) from None
    return code, reason
