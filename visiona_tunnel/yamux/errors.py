"""Errors of the yamux session (the trio driver).

Stream and session failures derive from trio's resource errors, so code written for any
``trio.abc.Stream`` handles them: a reset stream or a dead session is a
``trio.BrokenResourceError``. The sans-IO core raises its own, trio-free errors
(:mod:`.core_errors`); the session turns them into these (:func:`session_error_of`).
"""

from __future__ import annotations

import trio

from .core_errors import GoAwayInForce, ProtocolViolation, StreamsExhausted, YamuxError
from .frames import GoAwayCode

__all__ = [
    "GoAwayError",
    "KeepAliveTimeout",
    "ProtocolError",
    "SessionClosed",
    "SessionEnded",
    "SessionTimeout",
    "StreamReset",
    "StreamsExhausted",
    "YamuxError",
    "session_error_of",
]


class SessionClosed(YamuxError, trio.BrokenResourceError):
    """The session has ended; nothing more can be sent or received on it.

    Subclasses say why. Each waiting task gets its own instance, chained (``__cause__``)
    to the error that ended the session.
    """


class SessionEnded(SessionClosed):
    """The session ended cleanly: closed by this side, or the peer hung up (EOF). ``async
    for stream in session`` stops on this one; any other reason is raised."""


class ProtocolError(SessionClosed):
    """The peer broke the yamux protocol; we sent GoAway(``code``) and ended the session."""

    def __init__(self, message: str, code: GoAwayCode = GoAwayCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[type[ProtocolError], tuple[str, GoAwayCode]]:
        return (type(self), (str(self), self.code))


class GoAwayError(SessionClosed):
    """A GoAway is in force: no new streams. ``code`` is the peer's code, or 0 for our own.

    A normal (code 0) GoAway lets existing streams finish; any other code ends the session.
    """

    def __init__(self, message: str, code: int = GoAwayCode.NORMAL, *, remote: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.remote = remote

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_go_away, (str(self), self.code, self.remote))


def _rebuild_go_away(message: str, code: int, remote: bool) -> GoAwayError:
    return GoAwayError(message, code, remote=remote)


class SessionTimeout(SessionClosed):
    """The peer or the transport stopped answering (write, or stream open, timed out)."""


class KeepAliveTimeout(SessionTimeout):
    """No frame arrived within the keepalive timeout after a keepalive ping."""


class StreamReset(YamuxError, trio.BrokenResourceError):
    """The stream was reset (RST), by the peer or by us; buffered data is discarded."""


def session_error_of(error: ProtocolViolation | GoAwayInForce) -> SessionClosed:
    """The session's error for what the core raised (chained to it)."""
    mapped: SessionClosed
    if isinstance(error, ProtocolViolation):
        mapped = ProtocolError(str(error), error.code)
    else:
        mapped = GoAwayError(str(error), remote=error.remote)
    mapped.__cause__ = error
    return mapped
