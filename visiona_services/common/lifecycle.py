"""Running a service process: until SIGINT or SIGTERM, then stopping it gracefully; a
listening address that cannot be bound is one line and exit code 1, not a traceback. The
process may use as many file descriptors as its hard limit allows (connections are bounded
by the services themselves, not by a soft limit of 1024)."""

from __future__ import annotations

import errno
import gc
import logging
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

__all__ = [
    "CannotListen",
    "Stoppable",
    "cannot_listen",
    "fail",
    "raise_descriptor_limit",
    "run_service",
    "serve_until_signal",
    "settle_garbage_collector",
]


class CannotListen(Exception):
    """A listener's address cannot be bound; the message names it (and its variable) and
    why."""


def cannot_listen(address: str, exc: OSError, variable: str | None = None) -> CannotListen:
    reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
    named = f" ({variable})" if variable else ""
    return CannotListen(f"cannot listen on {address}{named}: {reason or exc}")


def fail(prog: str, message: str, code: int) -> int:
    """One line on stderr; the exit code."""
    print(f"{prog}: {message}", file=sys.stderr)
    return code


def run_service(
    prog: str, serve: Callable[..., Awaitable[Any]], config: object, logger: logging.Logger
) -> int:
    """:func:`serve_until_signal` in a new trio run; the process's exit code."""
    raise_descriptor_limit(logger)
    failure: str | None = None
    try:
        trio.run(serve_until_signal, serve, config, logger)
    except* CannotListen as group:
        failure = str(_first(group))
    return fail(prog, failure, 1) if failure else 0


def raise_descriptor_limit(logger: logging.Logger) -> int:
    """Raise ``RLIMIT_NOFILE``'s soft limit to the hard one (as Go programs do at start);
    the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the descriptor limit", extra={"error": str(exc)})
            return soft
        soft = hard
    logger.info("file descriptors", extra={"limit": soft})
    return soft


#: ``gc.set_threshold`` for a service once it runs (CPython's default: 700, 10, 10).
GC_THRESHOLDS = (50_000, 2, 100)


def settle_garbage_collector() -> None:
    """Once start-up is over: what it made (modules, apps, configuration) lives as long as
    the process, so it is frozen out of every collection; and the young generation grows
    to :data:`GC_THRESHOLDS`' 50,000 objects.

    Why: with CPython's 700, everything that lives a few milliseconds (a keepalive ping's
    objects, a forward's) survives a young collection and is promoted, and every few
    seconds a full collection walks every object of every tunnel -- 1.25 s with the event
    loop stopped at 10,000 tunnels (benchmarks/many_agents.py). With 50,000 such objects
    die young, the middle generation stays small (at most 100,000 objects; its longest
    pause measured 93 ms at 10,000 tunnels), and full collections come rarely.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _first(group: BaseExceptionGroup[CannotListen]) -> CannotListen:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


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
            settle_garbage_collector()
            async for signum in signals:
                logger.info("stopping", extra={"signal": signal.Signals(signum).name})
                server.stop()
                break
