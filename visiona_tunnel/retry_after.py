"""``Retry-After`` (RFC 9110 section 10.2.3): how long a server asked us to wait."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

__all__ = ["MAX_RETRY_AFTER", "parse_retry_after"]

#: A ``Retry-After`` longer than this (seconds) is taken as this.
MAX_RETRY_AFTER = 3600.0


def parse_retry_after(value: bytes | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` (seconds, or an HTTP date) -> seconds from ``now`` (default: the
    clock), within ``[0, MAX_RETRY_AFTER]``; None if absent or not understood."""
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if text.isascii() and text.isdigit():
        return min(float(int(text)), MAX_RETRY_AFTER) if len(text) < 12 else MAX_RETRY_AFTER
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        return None
    seconds = moment.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
