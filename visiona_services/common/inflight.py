"""Counting work in flight, so that a shutdown can wait for it to finish.

::

    inflight = InFlight()

    async def handler() -> None:
        with inflight:                 # counted from here ...
            await forward()            # ... to here, however the block ends

    async def shutdown() -> None:
        with trio.move_on_after(grace):
            await inflight.wait_idle()
"""

from __future__ import annotations

from types import TracebackType

import trio


class InFlight:
    """A counter of running operations with a wait for "none running".

    Entering (``with inflight:``) never blocks: refusing new work while shutting down is
    the caller's decision (check a draining flag first). ``wait_idle`` returns once the
    count is zero, at once if it already is.
    """

    def __init__(self) -> None:
        self._count = 0
        self._idle = trio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        """How many operations are running now."""
        return self._count

    def __enter__(self) -> InFlight:
        if self._count == 0:
            self._idle = trio.Event()
        self._count += 1
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until no operation is running (a checkpoint even if none is)."""
        await trio.lowlevel.checkpoint()
        while self._count:
            await self._idle.wait()
