"""The invariant checker's window count agrees with a brute force over random admissions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agents.store.checks import process_overcommit, window_violations


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


@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2), st.integers(1, 3)), max_size=25),
    st.integers(1, 3),
)
def test_process_overcommit_finds_exactly_the_moments_over_capacity(
    spans: list[tuple[int, int, int]], capacity: int
) -> None:
    """Random process lifetimes (start slot, length, worker pid) written as a ledger: a
    violation is reported iff some start finds more live processes than the capacity, and
    processes of excluded workers never count."""
    events: list[tuple[int, int, str]] = []
    for i, (start, length, ppid) in enumerate(spans):
        events.append((2 * start + 1, 1, f"+ j{i} 1 {ppid}"))
        events.append((2 * (start + length) + 2, 0, f"- j{i} 1 {ppid}"))
    ledger = [line for _, _, line in sorted(events)]
    for excluded in (set(), {1}):
        counted = [(s, s + n) for s, n, p in spans if p not in excluded]
        over = any(sum(1 for a, b in counted if a <= s0 <= b) > capacity for s0, _ in counted)
        assert bool(process_overcommit(ledger, capacity, excluded)) == over
