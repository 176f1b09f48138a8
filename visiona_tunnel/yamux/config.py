"""Session configuration: hashicorp/yamux's ``DefaultConfig()`` plus our knobs."""

from __future__ import annotations

from typing import Any

import attrs

#: Every stream starts with this receive window on both sides (spec.md).
INITIAL_STREAM_WINDOW = 256 * 1024


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class Config:
    """How a session behaves. Defaults mirror hashicorp/yamux ``DefaultConfig()``.

    Times are in seconds; ``None`` turns a timeout off.
    """

    #: Inbound streams waiting for ``accept_stream``; a SYN beyond this is answered with RST.
    accept_backlog: int = attrs.field(default=256, validator=_positive)
    #: Send a ping every ``keepalive_interval`` and end the session if nothing arrives in time.
    enable_keepalive: bool = True
    keepalive_interval: float = attrs.field(default=30.0, validator=_positive)
    #: How long after a keepalive ping the peer has to send *anything*; ``None`` means
    #: ``connection_write_timeout``, which is what hashicorp waits for its ping.
    keepalive_timeout: float | None = attrs.field(default=None, validator=_positive)
    #: A write to the transport that takes longer than this ends the session.
    connection_write_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Receive window of each stream. Must be at least 256 KiB.
    max_stream_window_size: int = attrs.field(default=INITIAL_STREAM_WINDOW)
    #: A stream we opened that is not ACKed within this ends the session (as hashicorp).
    stream_open_timeout: float | None = attrs.field(default=75.0, validator=_positive)
    #: After our FIN, how long the peer has to send its FIN before we RST the stream.
    stream_close_timeout: float | None = attrs.field(default=300.0, validator=_positive)
    #: Outgoing Data frames carry at most this many payload bytes (go-yamux uses 64 KiB).
    max_frame_size: int = attrs.field(default=64 * 1024, validator=_positive)
    #: Opt-in receive-window auto-tuning: start at 256 KiB and double a stream's window,
    #: up to ``max_stream_window_size``, whenever the reader uses it up within a few RTTs.
    #: Off by default, so the wire behaviour is hashicorp's.
    auto_tune_window: bool = False

    @max_stream_window_size.validator
    def _check_window(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < INITIAL_STREAM_WINDOW:
            raise ValueError(
                f"max_stream_window_size must be at least {INITIAL_STREAM_WINDOW}, got {value}"
            )
        if value > 2**31:
            raise ValueError(f"max_stream_window_size must be at most 2**31, got {value}")

    @property
    def ping_timeout(self) -> float:
        """How long a keepalive ping may go unanswered."""
        if self.keepalive_timeout is None:
            return self.connection_write_timeout
        return self.keepalive_timeout
