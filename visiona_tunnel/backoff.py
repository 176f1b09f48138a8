"""Reconnect delays: exponential backoff, base 1 s doubling, capped at 30 s.

``backoff(1..7)`` is 1, 2, 4, 8, 16, 30, 30 seconds, as the Go tunnel client we mirror.
With ``jitter``, each delay is drawn from ``[delay * (1 - jitter), delay]`` so that a fleet
of agents cut off together by a relay restart does not redial in lock-step.
"""

from __future__ import annotations

import random

BASE_DELAY = 1.0
MAX_DELAY = 30.0


def backoff(
    attempt: int,
    *,
    base: float = BASE_DELAY,
    cap: float = MAX_DELAY,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before redial number ``attempt + 1``, after ``attempt`` failures.

    Args:
        attempt: failed attempts so far (1 for the first failure); ``<= 0`` gives ``base``.
        base: the first delay. cap: the largest delay.
        jitter: fraction in ``[0, 1]`` of the delay that may be randomly taken off.
        rng: source of randomness for jitter (default: the ``random`` module's).
    """
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be within [0, 1], got {jitter!r}")
    # Doubling stops once past the cap, so huge attempt numbers cannot overflow.
    delay = base
    for _ in range(max(attempt, 1) - 1):
        delay *= 2
        if delay >= cap:
            break
    delay = min(delay, cap)
    if jitter:
        delay -= (rng or random).uniform(0.0, jitter * delay)
    return delay
