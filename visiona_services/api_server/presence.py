"""Which devices are online: the remote-proxy's live tunnels, as its event stream
(``GET /internal/events``) reports them. Process memory only; the stream's snapshot
rebuilds it after every (re)connection."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import trio

__all__ = ["LiveSession", "Presence"]


@attrs.frozen
class LiveSession:
    device_id: str
    #: ISO 8601, as the remote-proxy wrote it.
    since: str | None
    remote_address: str | None
    rtt_ms: float | None

    @classmethod
    def from_json(cls, session: dict[str, Any]) -> LiveSession:
        rtt = session.get("rtt_ms")
        return cls(
            device_id=str(session["device_id"]),
            since=session.get("since"),
            remote_address=session.get("remote_address"),
            rtt_ms=float(rtt) if isinstance(rtt, int | float) else None,
        )


@attrs.define
class Presence:
    _live: dict[str, LiveSession] = attrs.field(factory=dict)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until_online(self, device_id: str, online: bool = True) -> None:
        """Return once the device is online (or, with ``online=False``, offline)."""
        while self.is_online(device_id) != online:
            await self._changed.wait()

    def get(self, device_id: str) -> LiveSession | None:
        return self._live.get(device_id)

    def is_online(self, device_id: str) -> bool:
        return device_id in self._live

    def up(self, session: LiveSession) -> bool:
        """A tunnel came up; True if the device was offline."""
        was_offline = session.device_id not in self._live
        self._live[session.device_id] = session
        self._notify()
        return was_offline

    def down(self, device_id: str) -> bool:
        """A tunnel went down; True if the device was online."""
        gone = self._live.pop(device_id, None) is not None
        self._notify()
        return gone

    def replace(self, sessions: Iterable[LiveSession]) -> tuple[set[str], set[str]]:
        """A snapshot: the live set becomes ``sessions``; returns the device ids that came
        online and those that went offline with it."""
        before = set(self._live)
        self._live = {session.device_id: session for session in sessions}
        self._notify()
        after = set(self._live)
        return after - before, before - after

    def clear(self) -> set[str]:
        """The stream is lost: nothing is known to be online any more."""
        gone = set(self._live)
        self._live.clear()
        self._notify()
        return gone
