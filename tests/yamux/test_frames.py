"""The yamux frame header: pinned wire numbers and the 12-byte codec."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from visiona_tunnel.yamux.frames import (
    HEADER_SIZE,
    MAX_STREAM_ID,
    VERSION,
    Flag,
    FrameType,
    GoAwayCode,
    Header,
    encode_header,
)

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)


class TestConst:
    """The numbers on the wire, as hashicorp's ``TestConst`` pins them."""

    def test_version(self) -> None:
        assert VERSION == 0

    def test_frame_types(self) -> None:
        assert {t.name: t.value for t in FrameType} == {
            "DATA": 0,
            "WINDOW_UPDATE": 1,
            "PING": 2,
            "GO_AWAY": 3,
        }

    def test_flags(self) -> None:
        assert {f.name: f.value for f in (Flag.SYN, Flag.ACK, Flag.FIN, Flag.RST)} == {
            "SYN": 1,
            "ACK": 2,
            "FIN": 4,
            "RST": 8,
        }

    def test_go_away_codes(self) -> None:
        assert {c.name: c.value for c in GoAwayCode} == {
            "NORMAL": 0,
            "PROTOCOL_ERROR": 1,
            "INTERNAL_ERROR": 2,
        }

    def test_header_size(self) -> None:
        assert HEADER_SIZE == 12

    def test_max_stream_id(self) -> None:
        assert MAX_STREAM_ID == 2**32 - 1

    def test_header_layout_is_big_endian_bbhii(self) -> None:
        assert struct.calcsize("!BBHII") == HEADER_SIZE
        header = encode_header(FrameType.PING, 0x0102, 0x03040506, 0x0708090A, version=0xFF)
        assert header == struct.pack("!BBHII", 0xFF, 2, 0x0102, 0x03040506, 0x0708090A)
        assert header == bytes.fromhex("ff 02 0102 03040506 0708090a")


#: Known frames and their exact bytes: version, type, flags, stream id, length.
KNOWN_FRAMES: list[tuple[Header, str]] = [
    (Header(0, FrameType.DATA, 0, 1, 5), "00 00 0000 00000001 00000005"),
    (Header(0, FrameType.DATA, Flag.SYN, 3, 0), "00 00 0001 00000003 00000000"),
    (Header(0, FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0), "00 01 0001 00000001 00000000"),
    (Header(0, FrameType.WINDOW_UPDATE, Flag.ACK, 2, 256 * 1024), "00 01 0002 00000002 00040000"),
    (Header(0, FrameType.WINDOW_UPDATE, Flag.FIN, 5, 0), "00 01 0004 00000005 00000000"),
    (Header(0, FrameType.WINDOW_UPDATE, Flag.RST, 6, 0), "00 01 0008 00000006 00000000"),
    (Header(0, FrameType.WINDOW_UPDATE, 0, 7, 131072), "00 01 0000 00000007 00020000"),
    (Header(0, FrameType.PING, Flag.SYN, 0, 0xDEADBEEF), "00 02 0001 00000000 deadbeef"),
    (Header(0, FrameType.PING, Flag.ACK, 0, 0xDEADBEEF), "00 02 0002 00000000 deadbeef"),
    (Header(0, FrameType.GO_AWAY, 0, 0, GoAwayCode.NORMAL), "00 03 0000 00000000 00000000"),
    (
        Header(0, FrameType.GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR),
        "00 03 0000 00000000 00000001",
    ),
    (
        Header(0, FrameType.GO_AWAY, 0, 0, GoAwayCode.INTERNAL_ERROR),
        "00 03 0000 00000000 00000002",
    ),
    (
        Header(0, FrameType.DATA, Flag.SYN | Flag.ACK | Flag.FIN | Flag.RST, MAX_STREAM_ID, 0),
        "00 00 000f ffffffff 00000000",
    ),
]


@pytest.mark.parametrize(("header", "wire"), KNOWN_FRAMES)
def test_known_frame_encodes_to_exact_bytes(header: Header, wire: str) -> None:
    expected = bytes.fromhex(wire)
    assert header.encode() == expected
    assert encode_header(FrameType(header.type), header.flags, header.stream_id, header.length) == (
        expected
    )


@pytest.mark.parametrize(("header", "wire"), KNOWN_FRAMES)
def test_known_frame_decodes_from_exact_bytes(header: Header, wire: str) -> None:
    assert Header.parse(bytes.fromhex(wire)) == header


@pytest.mark.parametrize(("header", "wire"), KNOWN_FRAMES)
def test_known_frame_decodes_at_an_offset_with_trailing_data(header: Header, wire: str) -> None:
    buffer = bytearray(b"junk" + bytes.fromhex(wire) + b"trailing")
    assert Header.parse(buffer, 4) == header
    assert Header.parse(memoryview(buffer), 4) == header


def test_parse_rejects_a_short_buffer() -> None:
    with pytest.raises(struct.error):
        Header.parse(bytes(HEADER_SIZE - 1))


@given(version=u8, type=u8, flags=u16, stream_id=u32, length=u32)
def test_encode_decode_round_trip(
    version: int, type: int, flags: int, stream_id: int, length: int
) -> None:
    header = Header(version, type, flags, stream_id, length)
    encoded = header.encode()
    assert len(encoded) == HEADER_SIZE
    assert encoded == struct.pack("!BBHII", version, type, flags, stream_id, length)
    assert Header.parse(encoded) == header


@given(type=st.sampled_from(FrameType), flags=u16, stream_id=u32, length=u32)
def test_encode_header_matches_header_encode(
    type: FrameType, flags: int, stream_id: int, length: int
) -> None:
    encoded = encode_header(type, flags, stream_id, length)
    assert encoded == Header(VERSION, type, flags, stream_id, length).encode()


@given(raw=st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_any_twelve_bytes_decode_and_reencode_unchanged(raw: bytes) -> None:
    assert Header.parse(raw).encode() == raw


@pytest.mark.parametrize("value", [-1, 2**32])
def test_encode_refuses_a_length_outside_u32(value: int) -> None:
    with pytest.raises(struct.error):
        encode_header(FrameType.DATA, 0, 1, value)
