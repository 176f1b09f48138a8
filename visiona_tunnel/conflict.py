"""Detecting misuse of a stream by two tasks at once (trio's streams do the same)."""

from __future__ import annotations

import trio


class ConflictDetector:
    """``with detector:`` raises ``trio.BusyResourceError`` if another task is inside.

    trio's own is private (``trio._util.ConflictDetector``); this is the same contract:
    detect the misuse, never wait.
    """

    __slots__ = ("_busy", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self._busy = False

    def __enter__(self) -> None:
        if self._busy:
            raise trio.BusyResourceError(self._message)
        self._busy = True

    def __exit__(self, *exc_info: object) -> None:
        self._busy = False
