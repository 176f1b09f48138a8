"""Deterministic test data, the same as the Go peers generate, and its digests."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import AsyncIterator, Iterator

_PERIOD = bytes(i * 7 % 251 for i in range(251))
#: Piece size for streamed data.
PIECE = 64 * 1024


def pattern(offset: int, size: int) -> bytes:
    """The peers' deterministic data: byte ``i`` is ``(i + offset) * 7 % 251``."""
    start = offset % 251
    repeats = (start + size) // 251 + 1
    return (_PERIOD * repeats)[start : start + size]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pattern_pieces(size: int, piece: int = PIECE) -> Iterator[bytes]:
    """``pattern(0, size)`` in pieces of ``piece`` bytes (the last may be shorter)."""
    for offset in range(0, size, piece):
        yield pattern(offset, min(piece, size - offset))


async def pattern_body(size: int, piece: int = PIECE) -> AsyncIterator[bytes]:
    """``pattern(0, size)`` as an async request body, never held whole."""
    for data in pattern_pieces(size, piece):
        yield data


@functools.cache
def pattern_sha256(size: int) -> str:
    """sha256 hex digest of ``pattern(0, size)``, computed piece by piece (and cached)."""
    digest = hashlib.sha256()
    for data in pattern_pieces(size):
        digest.update(data)
    return digest.hexdigest()
