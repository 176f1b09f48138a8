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
            # What start-up made (modules, the apps, the configuration) lives as long as
            # the process: out of the collector's way, a full collection walks only what
            # came after (the tunnels).
            gc.freeze()
            async for signum in signals:
                logger.info("stopping", extra={"signal": signal.Signals(signum).name})
                server.stop()
                break
