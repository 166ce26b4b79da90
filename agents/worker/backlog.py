"""Dispatches fetched and not started yet: decoded once on arrival, started earliest-due
first (``agents.core.offsets.start_order``: offset order within a partition), none before
its not-before instant (a held dispatch does not hold up the others of its partition).

A not-before is an instant of the scheduler's clock (the database's, as ``dispatched_at``);
the worker holds a dispatch on its own monotonic clock, shifted by the least
``arrival − dispatched_at`` it has seen (``lag``: its clock's offset plus the shortest trip,
and no trip is shorter), so the start is never early by the scheduler's clock, whatever the
worker's wall clock says, and late by about the shortest trip only."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import msgspec

from agents.context import RawMessage
from agents.core.offsets import start_order
from agents.worker.source import Handover
from streams.errors import InvalidEvent
from streams.events import Dispatch, decode

# a dispatch carries a job intake bounded by ``max_payload_bytes`` plus admission's fields
DISPATCH_ALLOWANCE = 16 * 1024
TP = tuple[str, int]


class DispatchId(msgspec.Struct, frozen=True):
    """The attempt a dispatch names, read leniently from one the worker cannot run (over
    the size limit, a field it does not know): that attempt fails with the reason instead
    of staying ``dispatched`` with its holds."""

    job_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    group: str | None = None


class Buffered:
    """A dispatch waiting for a slot: where it came from, decoded once on arrival (or why it
    cannot be), and admission's due time (the start order; unreadable: last)."""

    __slots__ = (
        "topic",
        "partition",
        "tp",
        "offset",
        "key",
        "value",
        "dispatch",
        "error",
        "named",
        "due",
        "not_before",
    )

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        max_bytes: int,
    ) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset
        self.tp: TP = (topic, partition)
        self.key, self.value = key, value
        self.dispatch: Dispatch | None = None
        self.error = ""
        self.named: DispatchId | None = None  # unreadable: which attempt it was, if known
        try:
            self.dispatch = decode(value, Dispatch, max_bytes=max_bytes)
        except InvalidEvent as exc:  # the slots dead-letter it with this reason
            self.error = str(exc)
            try:
                self.named = msgspec.json.decode(value or b"", type=DispatchId)
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
        self.due = float("inf") if self.dispatch is None else self.dispatch.due or float("inf")
        self.not_before = 0.0  # on the worker's monotonic clock (``Backlog.add``); 0: none

    def raw(self) -> RawMessage:
        return RawMessage(self.topic, self.partition, self.offset, self.key, self.value)


class Backlog:
    """The buffer between the consumer and the slots. Every message added is ``started`` in
    the offset tracker (its offset is not committed until it is finished)."""

    def __init__(self, tracker: Handover, max_payload_bytes: int) -> None:
        self.tracker = tracker
        self.max_bytes = max_payload_bytes + DISPATCH_ALLOWANCE
        self.items: deque[Buffered] = deque()
        # an older attempt of a job that a newer buffered dispatch supersedes (set by the
        # slots: it is remembered as cancelled, so it is dropped when its turn comes)
        self.on_superseding: Callable[[Dispatch], None] = lambda _d: None
        self.on_fetched: Callable[[Buffered], None] | None = None
        self.timed = 0  # buffered dispatches with a not-before (none: the common case)
        self.lag = math.inf  # least (arrival on the monotonic clock − dispatched_at) seen

    def __len__(self) -> int:
        return len(self.items)

    def add(self, msgs: Iterable[Any], on_error: Callable[[Any], None]) -> None:
        """Decode and buffer consumed messages (``on_error``: a consumer error instead)."""
        arrived = time.monotonic()
        for m in msgs:
            if m.error():
                on_error(m.error())
                continue
            b = Buffered(m.topic(), m.partition(), m.offset(), m.key(), m.value(), self.max_bytes)
            self.tracker.started(b.tp, b.offset)
            d = b.dispatch
            if d is not None:
                self.lag = min(self.lag, arrived - d.dispatched_at)
                if d.not_before:
                    b.not_before = d.not_before + self.lag
            if d is not None and d.attempt > 1:  # rare: a retry, or a handed-back dispatch
                self.on_superseding(d)
            self.items.append(b)
            if b.not_before:
                self.timed += 1
            if self.on_fetched is not None:
                self.on_fetched(b)

    def pop_upto(self, n: int, now: float) -> list[Buffered]:
        """The next ``n`` buffered dispatches to start at ``now``, in order (fewer when fewer
        are buffered or due): per partition in offset order, earliest due first across
        partitions (``agents.core.offsets.start_order``); one whose not-before is later
        stays, and the partition's later ones may go first."""
        if self.timed:
            return self._pop_timed(n, now)
        items = self.items
        if n >= 1 and len(items) == 1:
            return [items.popleft()]
        picked = start_order([(m.tp, m.due) for m in items], n)
        out = [items[i] for i in picked]
        if len(picked) == len(items):
            items.clear()
        elif picked == list(range(len(picked))):  # a prefix (FIFO: no due times apart)
            for _ in picked:
                items.popleft()
        else:
            gone = set(picked)
            self.items = deque(m for i, m in enumerate(items) if i not in gone)
        return out

    def _pop_timed(self, n: int, now: float) -> list[Buffered]:
        items = self.items
        free = [i for i, m in enumerate(items) if m.not_before <= now]
        picked = [free[j] for j in start_order([(items[i].tp, items[i].due) for i in free], n)]
        out = [items[i] for i in picked]
        gone = set(picked)
        self.items = deque(m for i, m in enumerate(items) if i not in gone)
        self.timed -= sum(1 for m in out if m.not_before)
        return out

    def next_not_before(self) -> float | None:
        """The earliest not-before of a held dispatch (None: none is held)."""
        if not self.timed:
            return None
        return min(m.not_before for m in self.items if m.not_before)

    def drop_partitions(self, gone: set[TP]) -> None:
        """Unstarted dispatches of partitions that moved belong to their next owner."""
        self.items = deque(m for m in self.items if m.tp not in gone)
        self._count_timed()

    def _count_timed(self) -> None:
        self.timed = sum(1 for m in self.items if m.not_before)

    def remove(self, job_id: str, attempt: int) -> list[Dispatch]:
        """Take the buffered dispatches of one attempt out (finished in the tracker)."""
        gone: list[Dispatch] = []
        kept: deque[Buffered] = deque()
        for m in self.items:
            d = m.dispatch
            if d is not None and d.job_id == job_id and d.attempt == attempt:
                self.tracker.finished(m.tp, m.offset)
                gone.append(d)
            else:
                kept.append(m)
        self.items = kept
        self._count_timed()
        return gone

    def older_attempts(self, d: Dispatch) -> list[Dispatch]:
        """Buffered dispatches of ``d``'s job for attempts before ``d``'s."""
        return [
            m.dispatch
            for m in self.items
            if m.dispatch is not None
            and m.dispatch.job_id == d.job_id
            and m.dispatch.attempt < d.attempt
        ]

    def job_ids(self) -> list[str]:
        return sorted({m.dispatch.job_id for m in self.items if m.dispatch is not None})
