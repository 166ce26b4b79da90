"""The control stage's SQL: operator settings (pause, resume, priority, rate limits) and job
commands (cancel and retry, applied in their order on ``jobs.control``, exactly once), in the
caller's transaction.

Invariants:
- Exactly once per command: ``control_offsets`` holds the next offset to apply per
  partition, locked and advanced in the transaction that applies the commands; a replayed
  batch (scheduler killed before its offsets were committed, a rebalance) changes nothing.
- In order: a cancel followed by a retry of the same job leaves it retried (the cancel is a
  state change here, not an event on its way through another stage).
- A cancel names the attempt it stopped (``CANCEL_FROM``); one that names an attempt applies
  only while that attempt is dispatched or running (``CANCEL_ATTEMPT_FROM``), mirroring
  ``agents.core.lifecycle``.
- A cancelled attempt that was in flight keeps its holds until its end is reported (the
  worker reports a cancelled attempt's end too) or the monitor finds it cannot be running:
  no resource is over-committed by a process that is still stopping.
- Dependents of a cancelled or retried job are settled in the same transaction (the
  dependency core decides), so they follow their trigger rule or wait again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg

from agents.core.deps import DependencyIndex
from agents.core.lifecycle import CANCEL_ATTEMPT_FROM, CANCEL_FROM, State
from agents.store.admission import notify
from agents.store.dependencies import apply_decisions, load_working_set
from agents.store.rows import ReadyJob, states
from streams.events import Control

Conn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True, slots=True)
class JobCommand:
    """A cancel or retry at its position on ``jobs.control``."""

    topic: str
    partition: int
    offset: int
    action: Literal["cancel", "retry"]
    job: str
    attempt: int | None = None
    reason: str = ""
    by: str = ""
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class Cancelled:
    """A job cancelled now: its group (the key of its events) and, when an attempt was in
    flight, that attempt (its worker stops it)."""

    job: str
    group: str | None
    attempt: int | None


@dataclass(slots=True)
class Applied:
    cancelled: list[Cancelled] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    ready: list[ReadyJob] = field(default_factory=list)
    replayed: int = 0  # commands skipped: applied by an earlier transaction


_CANCEL = """
WITH old AS (SELECT id, state, attempt FROM jobs WHERE id = %(id)s FOR UPDATE),
u AS (
    UPDATE jobs j SET state = 'cancelled', finished_at = to_timestamp(%(at)s), error = %(why)s,
        gate = NULL, updated_at = now()
    FROM old
    WHERE j.id = old.id AND (
        (%(attempt)s::int IS NULL AND old.state = ANY(%(from)s))
        OR (old.state = ANY(%(attempt_from)s) AND old.attempt = %(attempt)s::int))
    RETURNING j.id, j.group_key, old.state AS was, j.attempt),
h AS (
    INSERT INTO job_history (job_id, attempt, event, detail)
    SELECT id, attempt, 'cancelled', jsonb_build_object('reason', %(why)s::text, 'by', %(by)s::text)
    FROM u)
SELECT id, group_key, was, attempt FROM u
"""

_RETRY = """
WITH u AS (
    UPDATE jobs SET state = 'waiting', max_attempts = greatest(max_attempts, attempt + 1),
        error = NULL, root_cause = NULL, gate = NULL, run_after = NULL, finished_at = NULL,
        exit_code = NULL, progress = NULL, updated_at = now()
    WHERE id = ANY(%(ids)s) AND state IN ('failed', 'cancelled') RETURNING id),
-- dependents failed by these roots without ever running wait for them again
again AS (
    UPDATE jobs SET state = 'waiting', error = NULL, root_cause = NULL, gate = NULL,
        finished_at = NULL, updated_at = now()
    WHERE root_cause IN (SELECT id FROM u) AND state IN ('failed', 'cancelled') AND attempt = 0
    RETURNING id),
h AS (
    INSERT INTO job_history (job_id, event, detail)
    SELECT id, 'retry', jsonb_build_object('by', %(by)s::text)
    FROM (SELECT id FROM u UNION ALL SELECT id FROM again) AS r)
SELECT id, true FROM u UNION ALL SELECT id, false FROM again
"""


async def unapplied(conn: Conn, cmds: Sequence[JobCommand]) -> list[JobCommand]:
    """The commands not applied yet, in order; locks and advances each partition's next
    offset (the caller's transaction makes both or neither durable)."""
    out: list[JobCommand] = []
    for topic, partition in sorted({(c.topic, c.partition) for c in cmds}):
        mine = sorted(
            (c for c in cmds if (c.topic, c.partition) == (topic, partition)),
            key=lambda c: c.offset,
        )
        cur = await conn.execute(
            """INSERT INTO control_offsets (topic, partition, next_offset) VALUES (%s, %s, 0)
               ON CONFLICT (topic, partition) DO UPDATE SET next_offset =
                   control_offsets.next_offset
               RETURNING next_offset""",
            (topic, partition),
        )
        row = await cur.fetchone()
        start = int(row[0]) if row else 0
        out.extend(c for c in mine if c.offset >= start)
        await conn.execute(
            "UPDATE control_offsets SET next_offset = greatest(next_offset, %s) "
            "WHERE topic = %s AND partition = %s",
            (mine[-1].offset + 1, topic, partition),
        )
    return sorted(out, key=lambda c: (c.topic, c.partition, c.offset))


async def apply_commands(
    conn: Conn,
    cmds: Sequence[JobCommand],
    *,
    now: float,
    grace_s: float,
    allow_cross_tenant: bool,
) -> Applied:
    """Apply the commands not applied yet, in order, then settle what they changed."""
    todo = await unapplied(conn, cmds)
    applied = Applied(replayed=len(cmds) - len(todo))
    changed: list[str] = []
    for c in todo:
        if c.action == "cancel":
            cur = await conn.execute(
                _CANCEL,
                {
                    "id": c.job,
                    "at": c.at or now,
                    "why": c.reason or "cancelled",
                    "by": c.by,
                    "attempt": c.attempt,
                    "from": states(CANCEL_FROM),
                    "attempt_from": states(CANCEL_ATTEMPT_FROM),
                },
            )
            row = await cur.fetchone()
            if row is None:
                continue
            jid, group, was, attempt = row
            # an attempt in flight keeps its holds until its end is reported (its process
            # may still be stopping): ``agents.store.dependencies``, or the monitor's sweep
            in_flight = was in (State.DISPATCHED, State.RUNNING)
            applied.cancelled.append(Cancelled(jid, group, attempt if in_flight else None))
            changed.append(jid)
        else:
            cur = await conn.execute(_RETRY, {"ids": [c.job], "by": c.by})
            for jid, root in await cur.fetchall():
                if root:
                    applied.retried.append(jid)
                changed.append(jid)
    if changed:
        changed = list(dict.fromkeys(changed))
        nodes = await load_working_set(conn, changed)
        decisions = DependencyIndex.of(nodes, allow_cross_tenant).settle(changed, now, grace_s)
        released = await apply_decisions(conn, decisions)
        # a retried job released now is the latest word; one cancelled later in the batch
        # is not ready any more (its release was guarded by ``waiting``)
        applied.ready = released
    return applied


async def apply_controls(conn: Conn, cmds: Sequence[Control]) -> None:
    """Pauses, resumes, priorities and rate limits, durable and announced (``NOTIFY``) in the
    caller's transaction, so every admission process reloads them."""
    for c in cmds:
        if c.action == "pause":
            await conn.execute(
                "INSERT INTO pauses (scope, name, reason, by_whom) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (scope, name) DO UPDATE SET reason = excluded.reason, "
                "by_whom = excluded.by_whom, at = now()",
                (c.scope, c.name, c.reason, c.by),
            )
        elif c.action == "resume":
            await conn.execute(
                "DELETE FROM pauses WHERE scope = %s AND name = %s", (c.scope, c.name)
            )
        elif c.action == "priority":
            await conn.execute(
                "UPDATE jobs SET priority = %s, updated_at = now() WHERE id = %s "
                "AND state IN ('waiting', 'ready')",
                (c.priority, c.name),
            )
            await conn.execute(
                "INSERT INTO job_history (job_id, event, detail) VALUES (%s, 'priority', "
                "jsonb_build_object('priority', %s::int, 'by', %s::text))",
                (c.name, c.priority, c.by),
            )
            await notify(conn, f"priority {c.name}")
            continue
        elif c.limit is None:
            await conn.execute(
                "DELETE FROM rate_limits WHERE scope = %s AND match = %s",
                (c.scope, c.name or "*"),
            )
        else:
            await conn.execute(
                'INSERT INTO rate_limits (scope, match, "limit", window_s) '
                "VALUES (%s, %s, %s, %s) ON CONFLICT (scope, match) DO UPDATE SET "
                '"limit" = excluded."limit", window_s = excluded.window_s, at = now()',
                (c.scope, c.name or "*", c.limit, c.window_s),
            )
        await notify(conn, "control")
