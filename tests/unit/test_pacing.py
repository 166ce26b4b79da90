"""The send pacer's invariants, property-tested (no clock: times are generated)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.core.pacing import Pacer

rates = st.floats(min_value=1.0, max_value=5000.0)
bursts = st.integers(min_value=1, max_value=50)
gaps = st.lists(st.floats(min_value=0.0, max_value=0.05), min_size=1, max_size=300)


@settings(max_examples=300)
@given(rates, bursts, gaps)
def test_sends_never_exceed_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[float]
) -> None:
    p = Pacer(rate, burst)
    now, sent = 0.0, []
    for gap in steps:
        now += gap
        if p.take(now):
            sent.append(now)
    for i, start in enumerate(sent):
        for j in range(i, len(sent)):
            allowed = burst + rate * (sent[j] - start) + 1e-6
            assert j - i + 1 <= allowed, (start, sent[j], j - i + 1)


@settings(max_examples=300)
@given(rates, bursts, gaps)
def test_a_send_told_to_wait_may_go_after_that_wait(
    rate: float, burst: int, steps: list[float]
) -> None:
    p = Pacer(rate, burst)
    now = 0.0
    for gap in steps:
        now += gap
        d = p.wait(now)
        assert d >= 0
        if d == 0:
            assert p.take(now)
        else:
            assert not p.take(now)
            now += d + 1e-9
            assert p.take(now)


@given(rates, bursts, st.integers(min_value=0, max_value=100))
def test_light_load_adds_no_wait_and_the_bucket_refills(rate: float, burst: int, used: int) -> None:
    p = Pacer(rate, burst)
    now = 0.0
    for _ in range(min(used, burst)):
        assert p.wait(now) == 0.0 and p.take(now)
    now += burst / rate + 1e-9
    for _ in range(burst):  # idle long enough: a whole burst goes at once again
        assert p.wait(now) == 0.0 and p.take(now)
    assert p.wait(now) > 0


def test_time_going_backwards_never_adds_tokens() -> None:
    p = Pacer(10, 1)
    assert p.take(5.0)
    assert not p.take(4.0)  # an earlier clock reading is not an idle period
    assert p.wait(4.0) == pytest.approx(0.1)


def test_invalid_pacers_are_refused() -> None:
    with pytest.raises(ValueError):
        Pacer(0, 1)
    with pytest.raises(ValueError):
        Pacer(10, 0.5)
