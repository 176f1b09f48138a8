"""``FrameReader`` against wsproto, the reference: for any bytes, split anyhow, the same
events -- payload pieces, message boundaries, pings, pongs, close codes and reasons -- and
the same failure (a ``CloseConnection`` with wsproto's code and message) at the same byte.

Differential property tests on frames built by hand (valid, fragmented, interleaved with
control frames, and malformed: bad opcodes, reserved bits, wrong masking, non-minimal and
oversized lengths, bad close payloads, bad UTF-8), on random bytes, and a fixed stream cut
at every position.
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import Event

from visiona_tunnel.wsconn import _apply_mask
from visiona_tunnel.wsframes import FrameReader


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    key: bytes | None = None,
    length_form: str = "minimal",
) -> bytes:
    """One frame, as any peer might write it (``length_form``: minimal, 16, 64, 64-msb)."""
    size = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if key is not None else 0
    if length_form == "16" or (length_form == "minimal" and 126 <= size <= 0xFFFF):
        head = bytes([first, mask_bit | 126]) + struct.pack("!H", size & 0xFFFF)
    elif length_form in ("64", "64-msb") or (length_form == "minimal" and size > 0xFFFF):
        big = size | (1 << 63) if length_form == "64-msb" else size
        head = bytes([first, mask_bit | 127]) + struct.pack("!Q", big)
    else:
        head = bytes([first, mask_bit | size])
    if key is None:
        return head + payload
    return head + key + _apply_mask(payload, key)


def events_of(receiver: Connection | FrameReader, pieces: list[bytes]) -> list[list[Event]]:
    """The events after each piece."""
    out = []
    for piece in pieces:
        receiver.receive_data(piece)
        out.append(list(receiver.events()))
    return out


def both(stream: bytes, cuts: list[int], *, client: bool) -> None:
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    pieces = [stream[a:b] for a, b in itertools.pairwise(points) if b > a]
    role = ConnectionType.CLIENT if client else ConnectionType.SERVER
    reference = events_of(Connection(role), pieces)
    ours = events_of(FrameReader(client=client, apply_mask=_apply_mask), pieces)
    assert ours == reference


# -- frames by hand -------------------------------------------------------------------------

OPCODES = st.sampled_from([0, 1, 2, 8, 9, 10]) | st.integers(0, 15)
PAYLOADS = st.binary(max_size=300) | st.sampled_from(
    [b"", b"x" * 125, b"y" * 126, b"z" * 1000, "héllo".encode(), b"\xff\xfe", b"\x03\xe8bye"]
)
CLOSE_PAYLOADS = st.sampled_from(
    [
        b"",
        b"\x03",
        b"\x03\xe8",
        b"\x03\xe8ok",
        b"\x03\xed",
        b"\x03\xee",
        b"\x0b\xb8x",
        b"\x07\xd0",
        b"\x13\x88",
        b"\x0f\xa1",
        b"\x03\xe8\xff",
        b"\x03\xe9going",
    ]
)


@st.composite
def frames(draw: st.DrawFn, masked: bool) -> bytes:
    opcode = draw(OPCODES)
    payload = draw(CLOSE_PAYLOADS if opcode == 8 and draw(st.booleans()) else PAYLOADS)
    wrong_mask = draw(st.integers(0, 19)) == 0
    key = draw(st.binary(min_size=4, max_size=4)) if masked != wrong_mask else None
    return frame(
        opcode,
        payload,
        fin=draw(st.integers(0, 3)) > 0,
        rsv=draw(st.sampled_from([0] * 12 + [1, 2, 4, 7])),
        key=key,
        length_form=draw(st.sampled_from(["minimal"] * 8 + ["16", "64", "64-msb"])),
    )


@st.composite
def streams(draw: st.DrawFn, masked: bool) -> bytes:
    parts = draw(st.lists(frames(masked), max_size=12))
    if draw(st.integers(0, 9)) == 0:
        parts.append(draw(st.binary(max_size=40)))  # trailing garbage
    return b"".join(parts)


@settings(max_examples=400)
@given(stream=streams(masked=True), cuts=st.lists(st.integers(0, 1 << 16), max_size=8))
def test_as_a_server_it_reads_any_frames_as_wsproto_does(stream: bytes, cuts: list[int]) -> None:
    both(stream, cuts, client=False)


@settings(max_examples=400)
@given(stream=streams(masked=False), cuts=st.lists(st.integers(0, 1 << 16), max_size=8))
def test_as_a_client_it_reads_any_frames_as_wsproto_does(stream: bytes, cuts: list[int]) -> None:
    both(stream, cuts, client=True)


@settings(max_examples=300)
@given(stream=st.binary(max_size=200), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_random_bytes_fail_as_in_wsproto(stream: bytes, cuts: list[int]) -> None:
    both(stream, cuts, client=False)
    both(stream, cuts, client=True)


# -- one stream, cut everywhere -------------------------------------------------------------

KEY = b"\x01\x02\x03\x04"
FRAGMENTED = b"".join(
    [
        frame(2, b"a" * 300, fin=False, key=KEY),
        frame(9, b"ping", key=KEY),
        frame(0, b"b" * 70000, fin=False, key=KEY),
        frame(0, b"", fin=False, key=KEY),
        frame(10, b"", key=KEY),
        frame(0, b"c" * 5, key=KEY),
        frame(2, b"", key=KEY),
        frame(1, "€uro".encode(), key=KEY),
        frame(8, b"\x03\xe8bye", key=KEY),
        frame(2, b"after the close", key=KEY),
    ]
)


def test_a_fragmented_stream_cut_at_every_position_reads_as_in_wsproto() -> None:
    step = 97  # every position near the frame boundaries, a sample inside the long payload
    positions = [*range(0, 400), *range(400, len(FRAGMENTED), step), len(FRAGMENTED) - 1]
    for cut in positions:
        both(FRAGMENTED, [cut], client=False)


def test_byte_by_byte_reads_as_in_wsproto() -> None:
    small = b"".join(
        [frame(2, b"hello", fin=False, key=KEY), frame(9, b"p", key=KEY), frame(0, b"!", key=KEY)]
    )
    both(small, list(range(len(small))), client=False)
