"""Token-bucket rate limits, in process memory.

Each (bucket, key) pair has a bucket of ``limit.requests`` tokens refilled continuously at
``limit.requests / limit.per_seconds`` per second; a request takes one token or is told how
long to wait. Memory is bounded: past :data:`MAX_KEYS` buckets, the least recently used go
(a bucket idle long enough to be evicted is full again anyway, or nearly).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from ipaddress import IPv6Address, ip_address, ip_network

from .config import RateLimit

__all__ = ["RateLimiter", "client_key"]

MAX_KEYS = 100_000


def client_key(address: str) -> str:
    """What a client's limits are keyed by: its IPv4 address, or its IPv6 /64 (one host
    has a whole /64 to pick addresses from)."""
    try:
        parsed = ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, IPv6Address) and parsed.ipv4_mapped is None:
        return str(ip_network(f"{parsed}/64", strict=False))
    return str(parsed.ipv4_mapped if isinstance(parsed, IPv6Address) else parsed)


class RateLimiter:
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_keys: int = MAX_KEYS
    ) -> None:
        self._clock = clock
        self._max_keys = max_keys
        #: key -> (tokens, when they were counted)
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def hit(self, key: Hashable, limit: RateLimit) -> float:
        """Take a token for ``key``: 0.0 if allowed, else the seconds until one is there."""
        now = self._clock()
        rate = limit.requests / limit.per_seconds
        tokens, then = self._buckets.pop(key, (float(limit.requests), now))
        tokens = min(float(limit.requests), tokens + (now - then) * rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait
