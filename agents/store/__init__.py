"""The one door to PostgreSQL: every statement jobstream runs lives in this package.

``PostgresJobStore`` is the façade the processes hold: connections, transactions and
migrations (``connection``) and the methods of each part (``cycle``, ``reconcile``,
``liveness``, ``reads``). The stages' set-based statements take the caller's connection inside
a cycle's transaction (``inserts``, ``lifecycle``, ``dependencies``, ``admission``,
``commands``); ``checks`` verifies the
invariants after a chaos run; ``rows`` holds the row types the parts share."""

from agents.store.connection import migrations
from agents.store.jobstore import PostgresJobStore
from agents.store.liveness import LostWork, Orphan, Undelivered

__all__ = ["LostWork", "Orphan", "PostgresJobStore", "Undelivered", "migrations"]
