"""``PostgresJobStore``: the store's façade, one object with the methods of every part."""

from __future__ import annotations

from agents.store.cycle import CycleStore
from agents.store.liveness import LivenessStore
from agents.store.reads import ReadStore
from agents.store.reconcile import ReconcileStore


class PostgresJobStore(CycleStore, ReconcileStore, LivenessStore, ReadStore):
    """PostgreSQL, the source of truth for job state: connections and transactions
    (``connection``), the hot cycle's transaction (``cycle``), dispatch confirmation
    (``reconcile``), workers' liveness (``liveness``) and the operator's reads (``reads``)."""
