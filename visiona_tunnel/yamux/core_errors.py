"""What the sans-IO core (:class:`~visiona_tunnel.yamux.connection.YamuxConnection`)
raises: plain exceptions, no trio. The trio driver (:mod:`~visiona_tunnel.yamux.session`)
turns a violation or a GoAway in force into the session's own errors
(:mod:`~visiona_tunnel.yamux.errors`), which are trio resource errors."""

from __future__ import annotations

from .frames import GoAwayCode

__all__ = ["GoAwayInForce", "ProtocolViolation", "StreamsExhausted", "YamuxError"]


class YamuxError(Exception):
    """Base class of every error raised by ``visiona_tunnel.yamux``."""


class ProtocolViolation(YamuxError):
    """The peer broke the protocol; the core has queued GoAway(``code``) and is done."""

    def __init__(self, message: str, code: GoAwayCode = GoAwayCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[type[ProtocolViolation], tuple[str, GoAwayCode]]:
        return (type(self), (str(self), self.code))


class GoAwayInForce(YamuxError):
    """No new stream: a GoAway is in force (the peer's when ``remote``, else ours)."""

    def __init__(self, message: str, *, remote: bool) -> None:
        super().__init__(message)
        self.remote = remote

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_go_away_in_force, (str(self), self.remote))


def _rebuild_go_away_in_force(message: str, remote: bool) -> GoAwayInForce:
    return GoAwayInForce(message, remote=remote)


class StreamsExhausted(YamuxError):
    """This side has used every stream id it may open (2**32 - 2 is the last)."""
