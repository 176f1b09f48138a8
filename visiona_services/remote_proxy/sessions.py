"""How the internal API shows a tunnel (a "session") and a moment: shared by
``GET /internal/sessions`` and the events stream (``GET /internal/events``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from visiona_tunnel.relay import TunnelStats

__all__ = ["iso_utc", "session_json"]


def iso_utc(timestamp: float | None = None) -> str:
    """``timestamp`` (Unix time; now if None) as ISO 8601 UTC with milliseconds:
    ``2025-01-31T12:00:00.123Z``."""
    moment = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def session_json(stats: TunnelStats) -> dict[str, object]:
    """One session as the API shows it."""
    return {
        "device_id": stats.key,
        "connected": True,
        "since": iso_utc(stats.connected_since),
        "remote_address": stats.remote_address,
        "open_streams": stats.open_streams,
        "rtt_ms": None if stats.rtt is None else round(stats.rtt * 1000, 3),
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
    }
