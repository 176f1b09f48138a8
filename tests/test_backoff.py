"""Reconnect delays: 1, 2, 4, 8, 16, 30, 30, ... seconds."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from visiona_tunnel.backoff import backoff


@pytest.mark.parametrize(
    ("attempt", "delay"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 30.0), (7, 30.0), (100, 30.0)],
)
def test_delay_doubles_from_one_second_up_to_thirty(attempt: int, delay: float) -> None:
    assert backoff(attempt) == delay


@pytest.mark.parametrize("attempt", [0, -1, -(10**9)])
def test_attempt_zero_or_less_gives_the_base(attempt: int) -> None:
    assert backoff(attempt) == 1.0


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert backoff(10**12) == 30.0


def test_base_and_cap_are_configurable() -> None:
    assert [backoff(a, base=0.5, cap=3.0) for a in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@given(attempt=st.integers(-5, 10_000), jitter=st.floats(0.0, 1.0), seed=st.integers())
def test_jitter_only_shortens_the_delay_by_at_most_its_fraction(
    attempt: int, jitter: float, seed: int
) -> None:
    plain = backoff(attempt)
    jittered = backoff(attempt, jitter=jitter, rng=random.Random(seed))
    assert plain * (1 - jitter) <= jittered <= plain


def test_jitter_spreads_a_fleet_of_agents() -> None:
    rng = random.Random(7)
    delays = {backoff(6, jitter=0.5, rng=rng) for _ in range(100)}
    assert len(delays) > 90


@pytest.mark.parametrize("jitter", [-0.1, 1.5])
def test_jitter_outside_zero_to_one_is_refused(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        backoff(1, jitter=jitter)
