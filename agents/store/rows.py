"""Row types exchanged with PostgreSQL, and the one helper that builds SQL text.

Invariant: SQL is built only from literal text and fixed fragments (``q``); values always
travel as parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, LiteralString

import msgspec
from psycopg import sql

from streams.events import JobSpec


def q(text: LiteralString, **fragments: sql.Composable) -> sql.Composed:
    """A query from literal SQL text and fixed SQL fragments (never from input)."""
    return sql.SQL(text).format(**fragments)


_encode_json = msgspec.json.Encoder().encode


def json_rows(rows: Sequence[Any] | Mapping[str, Any]) -> str:
    """A batch of rows (tuples or lists) as one JSON document, for a hot statement to read
    with ``jsonb_array_elements(%s::jsonb)``: encoded at C speed, where psycopg's array
    dumper quotes every element of every array parameter in Python."""
    return _encode_json(rows).decode()


def states(values: Sequence[str]) -> list[str]:
    return [str(s) for s in values]


# what admission queues a job by (``QueuedRow`` after id, tenant, kind)
_QUEUE_FIELDS = (
    "priority, size, extract(epoch from ready_at)::float8, resources, exclusive, "
    "extract(epoch from run_after)::float8, extract(epoch from run_at)::float8"
)
QUEUED_COLS = sql.SQL("id, tenant, kind, " + _QUEUE_FIELDS)
READY_COLS = sql.SQL(
    "id, tenant, kind, extract(epoch from submitted_at)::float8 AS submitted_at, " + _QUEUE_FIELDS
)
DISPATCH_COLS = sql.SQL(
    "id, attempt, tenant, kind, args, timeout_s, extract(epoch from submitted_at)::float8, "
    "extract(epoch from dispatched_at)::float8, group_key, not_before"
)
# whether the broker has a dispatched job's dispatch (``jobs j``): its start was recorded or
# it was re-sent (``dispatch_confirmed``), or its send's row is gone (``dispatch_sends``)
CONFIRMED = sql.SQL(
    "(j.dispatch_confirmed OR (j.dispatch_send IS NOT NULL AND NOT EXISTS "
    "(SELECT 1 FROM dispatch_sends s WHERE s.id = j.dispatch_send)))"
)
RETURN_STATE = sql.SQL(
    "RETURNING state, attempt, tenant, kind, extract(epoch from submitted_at)::float8"
)


@dataclass(frozen=True, slots=True)
class Accepted:
    job: JobSpec
    submitted_at: float
    max_attempts: int
    origin: tuple[str, int, int]
    workflow_id: str | None = None


@dataclass(frozen=True, slots=True)
class QueuedRow:
    """A ready job as admission queues it (``QUEUED_COLS``)."""

    id: str
    tenant: str
    kind: str
    priority: int
    size: int
    ready_at: float
    resources: list[str]
    exclusive: str | None
    run_after: float | None = None  # not admitted before: a retry's backoff or ``run_at``
    run_at: float | None = None  # the submission asked to run then (``run_at``/``delay_s``)

    @property
    def scheduled(self) -> bool:
        """Waiting for its ``run_at`` (not a retry's backoff)."""
        return self.run_at is not None and self.run_after == self.run_at


@dataclass(frozen=True, slots=True)
class ReadyJob:
    """A job that became ready. Read with ``READY_COLS`` it also carries what admission
    queues it by (``ready_at`` set), so an owner in the same process needs no read."""

    id: str
    tenant: str
    kind: str
    submitted_at: float
    priority: int = 0
    size: int = 0
    ready_at: float | None = None
    resources: list[str] | None = None
    exclusive: str | None = None
    run_after: float | None = None
    run_at: float | None = None

    def queued_row(self) -> QueuedRow | None:
        """The row admission queues, if this was read with ``READY_COLS``."""
        if self.ready_at is None:
            return None
        return QueuedRow(
            self.id,
            self.tenant,
            self.kind,
            self.priority,
            self.size,
            self.ready_at,
            self.resources or [],
            self.exclusive,
            self.run_after,
            self.run_at,
        )


@dataclass(frozen=True, slots=True)
class DispatchJob:
    id: str
    attempt: int
    tenant: str
    kind: str
    args: dict[str, Any]
    timeout_s: float | None
    submitted_at: float
    dispatched_at: float
    group: str | None
    not_before: float | None = None  # a rate limit held at the start


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
