"""Bounds the tunnel listener keeps against hostile peers: connections still in their
handshake (in all and per client address), refused attempts per client address (token
guessing), and a log line per interval instead of one per event.

All plain state (no tasks, no I/O); time comes from the caller (``trio.current_time()``).
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict

import attrs

__all__ = ["AttemptLimit", "AttemptLimiter", "EveryInterval", "Occupancy", "Place", "address_key"]


def address_key(address: str) -> str:
    """Who an attempt counts against: the IPv4 address, or the IPv6 /64 (one host can
    have a whole /64); an address that does not parse counts as itself."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@attrs.frozen
class AttemptLimit:
    """Refused attempts allowed per client address: ``burst`` at once, then one per
    ``60 / per_minute`` seconds; ``max_addresses`` bounds the memory it takes."""

    burst: int = 10
    per_minute: float = 30.0
    max_addresses: int = 65536


class AttemptLimiter:
    """A token bucket per client address, spent by refused attempts only.

    :meth:`retry_after` says whether an address may try now (0) or how many seconds it
    must wait; :meth:`refused` spends one token. The table holds at most
    ``limit.max_addresses`` addresses; the least recently refused goes first (a bucket
    that has refilled says nothing anyway).
    """

    def __init__(self, limit: AttemptLimit = AttemptLimit()) -> None:
        self.limit = limit
        # address -> (tokens, at): the tokens left at time ``at``
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return float(self.limit.burst)
        tokens, at = entry
        return min(float(self.limit.burst), tokens + (now - at) * self.limit.per_minute / 60)

    def retry_after(self, address: str, now: float) -> float:
        """0 if ``address`` may try now, else the seconds until it may."""
        tokens = self._tokens(address_key(address), now)
        if tokens >= 1:
            return 0.0
        if self.limit.per_minute <= 0:
            return math.inf
        return (1 - tokens) * 60 / self.limit.per_minute

    def refused(self, address: str, now: float) -> None:
        """An attempt from ``address`` was refused: it spends a token."""
        key = address_key(address)
        tokens = self._tokens(key, now)
        self._buckets[key] = (max(0.0, tokens - 1), now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.limit.max_addresses:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class EveryInterval:
    """Say when something that happens often should be logged: the first time, then at
    most once per ``interval`` seconds, with how many happened since."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last = -math.inf
        self._count = 0

    def due(self, now: float) -> int:
        """Count one event; how many to report now (0: not yet)."""
        self._count += 1
        if now - self._last < self.interval:
            return 0
        count, self._count, self._last = self._count, 0, now
        return count


class Occupancy:
    """Places under two caps: in all, and per client address (:func:`address_key`). The
    tunnel listener holds one for each connection until it is a tunnel or ends."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.taken = 0
        self._by_address: dict[str, int] = {}

    def take(self, address: str) -> Place | None:
        """A place for ``address``; None (and nothing taken) if a cap is reached."""
        key = address_key(address)
        held = self._by_address.get(key, 0)
        if self.taken >= self.total or held >= self.per_address:
            return None
        self.taken += 1
        self._by_address[key] = held + 1
        return Place(self, key, address)

    def _give_back(self, key: str) -> None:
        held = self._by_address[key] - 1
        if held:
            self._by_address[key] = held
        else:
            del self._by_address[key]
        self.taken -= 1


class Place:
    """One place of an :class:`Occupancy`, taken for ``address`` until :meth:`give_back`."""

    def __init__(self, occupancy: Occupancy, key: str, address: str) -> None:
        self.address = address
        self._occupancy: Occupancy | None = occupancy
        self._key = key

    def give_back(self) -> None:
        """Free the place; again, nothing happens."""
        occupancy, self._occupancy = self._occupancy, None
        if occupancy is not None:
            occupancy._give_back(self._key)
