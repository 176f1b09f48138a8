"""Running a service process until SIGINT or SIGTERM, then stopping it gracefully."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

__all__ = ["Stoppable", "serve_until_signal"]


class Stoppable(Protocol):
    """What a service's ``task_status.started`` gives: a way to begin its shutdown."""

    @property
    def stop(self) -> Callable[[], None]: ...


async def serve_until_signal(
    serve: Callable[..., Awaitable[Any]], config: object, logger: logging.Logger
) -> None:
    """``serve(config)`` (started with a :class:`Stoppable`) until the first SIGINT or
    SIGTERM, then ``stop()`` and wait for it to return."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server: Stoppable = await nursery.start(serve, config)
            async for signum in signals:
                logger.info("stopping", extra={"signal": signal.Signals(signum).name})
                server.stop()
                break
