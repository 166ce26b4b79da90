"""Property tests of the commit position tracker (agents.core.offsets)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agents.core.offsets import OffsetTracker


@given(
    st.integers(1, 60).flatmap(
        lambda n: st.tuples(st.just(n), st.permutations(range(n)), st.integers(0, n))
    )
)
def test_commit_never_passes_an_unfinished_offset(case: tuple[int, list[int], int]) -> None:
    n, order, finish_count = case
    t = OffsetTracker()
    for off in range(n):
        t.started("p", off)
    finished = set(order[:finish_count])
    committed = -1
    for off in order[:finish_count]:
        t.finished("p", off)
        pos = t.commit_positions().get("p")
        if pos is not None:
            assert pos > committed, "positions only move forward"
            committed = pos
            assert all(o in finished for o in range(pos)), "never past an unfinished offset"
    # when everything is finished, the position is one past the last offset
    if finish_count == n:
        assert committed == n


def test_partitions_are_independent_and_forget_drops_one() -> None:
    t = OffsetTracker()
    t.started("a", 0)
    t.started("b", 5)
    t.finished("b", 5)
    assert t.commit_positions() == {"b": 6}
    t.forget("a")
    t.finished("a", 0)
    assert t.commit_positions() == {}
