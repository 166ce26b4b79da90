"""Which of the hot topics' fetched messages a cycle handles: lifecycle events before a flood of
submissions.

The hot cycle's consumer hands over messages in the order its fetches brought them, so a
burst of submissions (tens of thousands at once) used to queue every lifecycle event behind
it: no outcome was recorded, no capacity freed and no job dispatched until the whole burst
was inserted (seconds, while workers sat idle). The cycle now drains what the consumer has
buffered into two lanes: *urgent* (lifecycle events and ready jobs: they free capacity and
start work) and *intake* (submissions). Each cycle takes the urgent lane first, then
submissions.

Pure: no I/O, no clock; messages are anything with ``topic`` and ``partition``.

Invariants (property-tested in tests/unit/test_lanes.py):
- Within a partition, messages leave in the order they arrived, and what a cycle takes of a
  partition is a prefix of what it held (so storing the offset after the last one handled
  never skips one).
- A cycle takes at most ``limit`` urgent messages and at most ``limit`` messages in all,
  except that it always takes at least ``limit // 4`` (and at least one) waiting submission
  while there are any: intake progresses whatever the rate of events.
- Nothing is lost or duplicated: every message added is taken once, unless its partition was
  dropped (revoked: its next owner reads it again from the committed offset).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from typing import Generic, Protocol, TypeVar


class Located(Protocol):
    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...


M = TypeVar("M", bound=Located)


class Lanes(Generic[M]):
    """Fetched messages not handled yet, urgent ones apart from submissions."""

    def __init__(self, intake_topics: Collection[str]) -> None:
        self.intake_topics = frozenset(intake_topics)
        self.urgent: deque[M] = deque()
        self.intake: deque[M] = deque()

    def __len__(self) -> int:
        return len(self.urgent) + len(self.intake)

    def add(self, messages: Iterable[M]) -> None:
        for m in messages:
            (self.intake if m.topic in self.intake_topics else self.urgent).append(m)

    def take(self, limit: int) -> list[M]:
        """One cycle's messages: urgent ones first, then submissions (see the invariants)."""
        limit = max(1, limit)
        out = [self.urgent.popleft() for _ in range(min(limit, len(self.urgent)))]
        room = max(limit - len(out), limit // 4, 1)
        out.extend(self.intake.popleft() for _ in range(min(room, len(self.intake))))
        return out

    def drop(self, partitions: Collection[tuple[str, int]]) -> int:
        """Forget the messages of ``partitions`` (revoked or lost); how many were dropped."""
        if not partitions or not len(self):
            return 0
        before = len(self)
        for lane in (self.urgent, self.intake):
            kept = [m for m in lane if (m.topic, m.partition) not in partitions]
            lane.clear()
            lane.extend(kept)
        return before - len(self)
