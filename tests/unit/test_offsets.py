"""Property tests of the commit position tracker (agents.core.offsets)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agents.core.offsets import OffsetTracker, next_to_start, start_order


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


def test_after_a_failed_commit_every_position_is_sent_again() -> None:
    t = OffsetTracker()
    for tp, off in (("a", 3), ("b", 7)):
        t.started(tp, off)
        t.finished(tp, off)
    assert t.commit_positions() == {"a": 4, "b": 8}
    assert t.commit_positions() == {}  # nothing moved: nothing to send
    assert t.commit_positions(everything=True) == {"a": 4, "b": 8}


buffers = st.lists(
    st.tuples(st.integers(0, 3), st.one_of(st.floats(0, 100), st.just(float("inf")))),
    min_size=1,
    max_size=16,
)


@given(buffers)
def test_start_order_keeps_offset_order_within_a_partition_and_picks_the_earliest_head(
    buffered: list[tuple[int, float]],
) -> None:
    """Draining a worker's buffer with next_to_start: each partition's dispatches start in
    the order they were buffered (offset order), and every pick is the head of a partition
    that holds the earliest-due dispatch still buffered."""
    items = [(tp, due, i) for i, (tp, due) in enumerate(buffered)]
    started: list[tuple[int, float, int]] = []
    while items:
        earliest = min(due for _, due, _ in items)
        k = next_to_start([(tp, due) for tp, due, _ in items])
        tp, due, i = items.pop(k)
        assert all(p != tp for p, _, _ in items[:k]), "a partition's head"
        assert earliest == float("inf") or any(
            p == tp and d == earliest for p, d, _ in [(tp, due, i), *items]
        ), "the partition holding the earliest-due dispatch"
        started.append((tp, due, i))
    for tp in {tp for tp, _ in buffered}:
        order = [i for p, _, i in started if p == tp]
        assert order == sorted(order)


@given(buffers, st.integers(0, 20))
def test_a_batch_starts_in_the_order_of_one_pick_at_a_time(
    buffered: list[tuple[int, float]], n: int
) -> None:
    """``start_order`` (a whole batch in one pass) picks what ``next_to_start`` picks when
    asked again after each pick."""
    items = list(enumerate(buffered))
    one_by_one: list[int] = []
    while items and len(one_by_one) < n:
        k = next_to_start([b for _, b in items])
        one_by_one.append(items.pop(k)[0])
    assert start_order(buffered, n) == one_by_one


def test_an_urgent_dispatch_lifts_its_partition_and_overtakes_the_others() -> None:
    assert next_to_start([("a", 50.0), ("b", 40.0), ("c", 5.0)]) == 2  # c's head: due 5
    # a holds the urgent one (due 1) behind its head: a's head goes first
    assert next_to_start([("b", 40.0), ("a", 50.0), ("a", 1.0), ("c", 5.0)]) == 1
    assert next_to_start([("a", 50.0), ("a", 1.0)]) == 0  # a's second waits for a's first
    assert next_to_start([("a", float("inf")), ("b", float("inf"))]) == 0  # no due: FIFO
