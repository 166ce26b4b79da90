"""The monitor's choice of dispatches to hand back (agents.scheduler.monitor.unowned)."""

from __future__ import annotations

from agents.scheduler.monitor import unowned
from agents.store import Undelivered


def _place(kind: str, job_id: str) -> str:
    return f"d.{kind}[{len(job_id)}]"


def test_only_dispatches_on_partitions_no_live_worker_holds_are_handed_back() -> None:
    waiting = [
        Undelivered("a", 1, "gpu", None, 20.0, False),  # d.gpu[1]: assigned to a live worker
        Undelivered("bb", 2, "gpu", "g", 30.0, True),  # d.gpu[2]: nobody
        Undelivered("c", 1, "cpu", None, 17.0, False),  # d.cpu[1]: nobody (another topic)
    ]
    assert unowned(waiting, {"d.gpu[1]", "d.cpu[2]"}, _place) == [waiting[1], waiting[2]]
    assert unowned(waiting, {"d.gpu[1]", "d.gpu[2]", "d.cpu[1]"}, _place) == []
    assert unowned([], set(), _place) == []
