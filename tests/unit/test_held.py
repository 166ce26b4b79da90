"""Jobs held until their ``run_after``: released at their time, a row read again replaces the
held one, each gate handed out once (again after ``regate``)."""

from __future__ import annotations

from agents.scheduler.held import Held
from agents.store.rows import QueuedRow


def row(job_id: str, run_after: float, priority: int = 0, run_at: float | None = None) -> QueuedRow:
    return QueuedRow(job_id, "t", "k", priority, 0, 0.0, [], None, run_after, run_at)


def test_held_rows_come_out_at_their_time_latest_row_first_gate_once() -> None:
    h = Held()
    assert h.hold(row("a", 10.0, run_at=10.0)) and h.hold(row("b", 5.0))
    assert not h.hold(row("a", 10.0, priority=3, run_at=10.0))  # same time: replaced, no wake
    gates = h.new_gates()
    assert gates["a"].kind == "scheduled" and gates["b"].kind == "backoff"
    assert gates["a"].until == 10.0 and h.new_gates() == {}  # once
    assert [r.id for r in h.due(4.0)] == [] and h.next_at() == 5.0
    assert [r.id for r in h.due(5.0)] == ["b"]
    assert h.hold(row("a", 12.0, priority=3, run_at=10.0))  # a new time (a retry's backoff)
    assert [r.id for r in h.due(11.0)] == []  # the old entry of "a" is skipped
    h.regate()
    assert set(h.new_gates()) == {"a"}
    (out,) = list(h.due(12.0))
    assert out.priority == 3 and len(h) == 0 and h.next_at() is None
