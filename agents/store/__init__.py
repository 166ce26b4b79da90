"""The one door to PostgreSQL: every statement jobstream runs lives in this package.

``PostgresJobStore`` is the façade the processes hold: connections, transactions and
migrations (``connection``) and the methods of each part (``cycle``, ``reconcile``,
``liveness``, ``reads``). The stages' set-based statements take the caller's connection inside
a cycle's transaction (``inserts``, ``lifecycle``, ``dependencies``, ``admission``,
``commands``); ``checks`` verifies the
invariants after a chaos run; ``rows`` holds the row types the parts share; ``watch`` reads
jobs' states for a command that waits, on one plain connection.

The names below load on first use, so a command that needs only ``watch`` does not pay for
the whole package (~40 ms of a short command's wall time)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agents.store.connection import migrations
    from agents.store.jobstore import PostgresJobStore
    from agents.store.liveness import LostWork, Orphan, Undelivered

__all__ = ["LostWork", "Orphan", "PostgresJobStore", "Undelivered", "migrations"]

_WHERE = {
    "migrations": "agents.store.connection",
    "PostgresJobStore": "agents.store.jobstore",
    "LostWork": "agents.store.liveness",
    "Orphan": "agents.store.liveness",
    "Undelivered": "agents.store.liveness",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'agents.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
