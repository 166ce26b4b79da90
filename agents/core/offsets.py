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
from dataclasses import dataclass, field
from typing import Generic, TypeVar


@dataclass
class _Partition:
    pending: list[int] = field(default_factory=list)  # heap of started, unfinished offsets
    finished: set[int] = field(default_factory=set)
    highest: int = -1  # highest offset handed out
    committable: int | None = None


K = TypeVar("K", bound=Hashable)


class OffsetTracker(Generic[K]):
    def __init__(self) -> None:
        self._parts: dict[K, _Partition] = {}

    def started(self, tp: K, offset: int) -> None:
        p = self._parts.setdefault(tp, _Partition())
        heapq.heappush(p.pending, offset)
        p.highest = max(p.highest, offset)

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
