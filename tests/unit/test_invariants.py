"""The invariant checker's window count agrees with a brute force over random admissions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agents.invariants import window_violations


@given(
    st.lists(st.floats(0, 20, allow_nan=False), max_size=60),
    st.integers(1, 6),
    st.floats(0.1, 5, allow_nan=False),
)
def test_window_violations_match_brute_force(times: list[float], limit: int, w: float) -> None:
    brute = sum(1 for t in times if sum(1 for u in times if t - w < u <= t) > limit)
    # ties: the sorted sweep counts equal times in order, brute force counts all of them
    if len(set(times)) == len(times):
        assert window_violations(times, limit, w) == brute
    assert (window_violations(times, limit, w) == 0) == (brute == 0)
