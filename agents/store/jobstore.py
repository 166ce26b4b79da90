"""``PostgresJobStore``: the store's façade, one object with the methods of every part."""

from __future__ import annotations

from agents.store.cycle import CycleStore
from agents.store.liveness import LivenessStore
from agents.store.reads import ReadStore
from agents.store.reconcile import ReconcileStore
from agents.store.schedules import ScheduleStore


class PostgresJobStore(CycleStore, ReconcileStore, LivenessStore, ReadStore, ScheduleStore):
    """PostgreSQL, the source of truth for job state: connections and transactions
    (``connection``), the hot cycle's transaction (``cycle``), dispatch confirmation
    (``reconcile``), workers' liveness (``liveness``), the operator's reads (``reads``) and
    periodic schedules (``schedules``)."""
