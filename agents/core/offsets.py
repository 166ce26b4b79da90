"""Which offset may be committed when messages finish out of order.

A worker runs several jobs at once; they finish in any order. Kafka commits a position per
partition, meaning "everything before this is done". :class:`OffsetTracker` keeps, per
partition, the offsets handed out and the ones finished, and says how far the committed
position may move.

Invariants (property-tested): the committable position never passes an offset that was
handed out and not finished, and never moves backwards.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar


class _Partition:
    __slots__ = ("pending", "finished", "highest", "committable")

    def __init__(self) -> None:
        self.pending: list[int] = []  # heap of started, unfinished offsets
        self.finished: set[int] = set()
        self.highest = -1  # highest offset handed out
        self.committable: int | None = None


K = TypeVar("K", bound=Hashable)


class OffsetTracker(Generic[K]):
    def __init__(self) -> None:
        self._parts: dict[K, _Partition] = {}

    def started(self, tp: K, offset: int) -> None:
        p = self._parts.get(tp)
        if p is None:
            p = self._parts[tp] = _Partition()
        heapq.heappush(p.pending, offset)
        if offset > p.highest:
            p.highest = offset

    def finished(self, tp: K, offset: int) -> None:
        p = self._parts.get(tp)
        if p is not None:
            p.finished.add(offset)

    def forget(self, tp: K) -> None:
        """Drop a partition (revoked in a rebalance)."""
        self._parts.pop(tp, None)

    def commit_positions(self, everything: bool = False) -> dict[K, int]:
        """Positions (next offset to read) that may be committed now, for partitions whose
        position moved since the last call (``everything``: for every partition with one,
        e.g. after a commit failed)."""
        out: dict[K, int] = {}
        for tp, p in self._parts.items():
            while p.pending and p.pending[0] in p.finished:
                p.finished.discard(heapq.heappop(p.pending))
            position = p.pending[0] if p.pending else p.highest + 1
            if position > 0 and (everything or p.committable is None or position > p.committable):
                p.committable = position
                out[tp] = position
        return out

    def in_flight(self) -> int:
        return sum(len(p.pending) - len(p.finished & set(p.pending)) for p in self._parts.values())


def next_to_start(buffered: Sequence[tuple[Hashable, float]]) -> int:
    """Which buffered dispatch (partition, due time) a worker starts next. Within a
    partition dispatches start in offset order, so the committed position never skips a
    started dispatch (what is redelivered after a crash never started). Across partitions:
    the head of the partition holding the earliest-due dispatch, so an urgent dispatch
    behind others in its partition lifts that partition (priority inheritance) instead of
    waiting until every other partition's heads are gone. Ties go to the one buffered
    first."""
    head: dict[Hashable, int] = {}
    best_tp: Hashable = None
    best_due = float("inf")
    for i, (tp, due) in enumerate(buffered):
        head.setdefault(tp, i)
        if due < best_due:
            best_tp, best_due = tp, due
    return 0 if best_tp is None else head[best_tp]


def start_order(buffered: Sequence[tuple[Hashable, float]], n: int) -> list[int]:
    """The first ``n`` dispatches (indexes) that :func:`next_to_start`, asked again after
    each pick, would start: one pass over the buffer for a whole batch. A partition's head
    goes next when the partition holds the earliest-due dispatch left (ties: the one
    buffered first), i.e. partitions compare by the minimum (due, index) of what is left."""
    rows: dict[Hashable, list[int]] = {}
    for i, (tp, _due) in enumerate(buffered):
        row = rows.get(tp)
        if row is None:
            rows[tp] = [i]
        else:
            row.append(i)
    # per partition: the minimum (due, index) from each position to its end
    rest: list[tuple[list[int], list[tuple[float, int]]]] = []
    for row in rows.values():
        mins: list[tuple[float, int]] = [(0.0, 0)] * len(row)
        best = (float("inf"), len(buffered))
        for j in range(len(row) - 1, -1, -1):
            here = (buffered[row[j]][1], row[j])
            if here < best:
                best = here
            mins[j] = best
        rest.append((row, mins))
    heads = [0] * len(rest)
    out: list[int] = []
    while len(out) < n:
        pick = -1
        for k, (row, mins) in enumerate(rest):
            if heads[k] < len(row) and (pick < 0 or mins[heads[k]] < rest[pick][1][heads[pick]]):
                pick = k
        if pick < 0:
            break
        out.append(rest[pick][0][heads[pick]])
        heads[pick] += 1
    return out
