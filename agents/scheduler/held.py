"""Ready jobs held until their ``run_after``: a retry's backoff, or a submission's ``run_at``.

The admission owner keeps them here, out of the core, until their time: a heap of
``(run_after, id)`` and the latest row of each job. They hold nothing meanwhile (no slot, no
semaphore, no rate-limit entry).

Invariants:
- A row read again while it waits replaces the one held (a priority change applies); an
  older heap entry of a replaced row is skipped when it comes up.
- A held job's gate (``scheduled`` or ``backoff``) is handed out once, with a text that does
  not change while it waits (gates are written only when their text changes), and again
  after ``regate`` (the gates written are no longer known). A row held by a transaction not
  committed yet gets its gate only once ``regate`` says it exists: a gate written before its
  row would be lost.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Iterator

from agents.core.admission import Gate
from agents.store.rows import QueuedRow


def waiting_gate(row: QueuedRow) -> Gate:
    """The gate of a job held until ``run_after``."""
    until = row.run_after or 0.0
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
    if row.scheduled:
        return Gate("scheduled", f"until {at}", until)
    return Gate("backoff", f"retry at {at}", until)


class Held:
    __slots__ = ("heap", "rows", "ungated")

    def __init__(self) -> None:
        self.heap: list[tuple[float, str]] = []
        self.rows: dict[str, QueuedRow] = {}
        self.ungated: set[str] = set()  # held rows whose gate was not handed out yet

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self.rows

    def hold(self, row: QueuedRow, *, gate: bool = True) -> bool:
        """Hold ``row`` until its ``run_after``; True when its time is new (a new job, or a
        new time): the caller's wake-up may have to come earlier. ``gate`` False: its gate
        is handed out only after ``regate``."""
        assert row.run_after is not None
        held = self.rows.get(row.id)
        self.rows[row.id] = row
        if held is not None and held.run_after == row.run_after:
            return False
        heapq.heappush(self.heap, (row.run_after, row.id))
        if gate:
            self.ungated.add(row.id)
        return True

    def due(self, now: float) -> Iterator[QueuedRow]:
        """Take out the rows whose time has come."""
        heap, rows = self.heap, self.rows
        while heap and heap[0][0] <= now:
            at, job_id = heapq.heappop(heap)
            row = rows.get(job_id)
            if row is None or row.run_after != at:
                continue  # an older entry of a row read again
            del rows[job_id]
            self.ungated.discard(job_id)
            yield row

    def next_at(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def new_gates(self) -> dict[str, Gate]:
        """The gates of the held jobs not handed out yet."""
        out = {i: waiting_gate(self.rows[i]) for i in self.ungated if i in self.rows}
        self.ungated.clear()
        return out

    def regate(self, ids: Iterable[str] | None = None) -> None:
        """Hand out again the gates of ``ids`` still held (all held jobs: None)."""
        self.ungated.update(self.rows if ids is None else (i for i in ids if i in self.rows))
