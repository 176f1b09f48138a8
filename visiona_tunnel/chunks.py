"""Received bytes kept as the chunks they arrived in, read back without re-copying them."""

from __future__ import annotations

import operator
from collections import deque


def checked_max_bytes(max_bytes: int | None) -> int | None:
    """``receive_some``'s ``max_bytes`` as an int, or None; ValueError if below 1."""
    if max_bytes is None:
        return None
    max_bytes = operator.index(max_bytes)
    if max_bytes < 1:
        raise ValueError("max_bytes must be at least 1")
    return max_bytes


class ChunkBuffer:
    """A FIFO of received chunks behind a stream's ``receive_some``.

    ``take(max_bytes)`` returns a whole chunk when it fits (no copy), else a slice of it,
    remembering where the rest starts. With ``coalesce``, chunks smaller than ``max_bytes``
    are joined into one answer (many small yamux frames, one read).
    """

    __slots__ = ("_chunks", "_coalesce", "_offset", "size")

    def __init__(self, *, coalesce: bool = False) -> None:
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # into self._chunks[0]
        self._coalesce = coalesce
        #: Bytes held.
        self.size = 0

    def __bool__(self) -> bool:
        return bool(self._chunks)

    def append(self, chunk: bytes) -> None:
        """Queue a non-empty chunk."""
        self._chunks.append(chunk)
        self.size += len(chunk)

    def clear(self) -> None:
        self._chunks.clear()
        self._offset = 0
        self.size = 0

    def take(self, max_bytes: int | None) -> bytes:
        """The next bytes, at most ``max_bytes`` (``None``: the next chunk). Not empty."""
        chunks = self._chunks
        chunk = chunks[0]
        start = self._offset
        if max_bytes is not None and len(chunk) - start > max_bytes:
            self._offset = start + max_bytes
            self.size -= max_bytes
            return chunk[start : start + max_bytes]
        chunks.popleft()
        self._offset = 0
        data = chunk[start:] if start else chunk
        if (
            not self._coalesce
            or max_bytes is None
            or not chunks
            or len(data) + len(chunks[0]) > max_bytes
        ):
            self.size -= len(data)
            return data
        parts = [data]
        size = len(data)
        while chunks and size + len(chunks[0]) <= max_bytes:
            size += len(chunks[0])
            parts.append(chunks.popleft())
        self.size -= size
        return b"".join(parts)
