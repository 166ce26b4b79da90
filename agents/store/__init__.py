"""The one door to PostgreSQL: every statement jobstream runs lives in this package.

``PostgresJobStore`` is the façade the processes hold (connections, transactions,
migrations and the methods of each part); the stages' set-based statements take the
caller's connection inside a cycle's transaction (``dependencies``, ``admission``,
``commands``); ``reads`` answers the operator's questions; ``checks`` verifies the
invariants after a chaos run; ``rows`` holds the row types the parts share."""

from agents.store.jobstore import LostWork, Orphan, PostgresJobStore, Undelivered, migrations

__all__ = ["LostWork", "Orphan", "PostgresJobStore", "Undelivered", "migrations"]
