"""A cycle's submissions persisted: every new job, its edges and its history in one statement,
idempotent on the job id (a replayed submission inserts nothing)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from agents.core.deps import Needs
from agents.store.rows import Accepted, json_rows

Conn = psycopg.AsyncConnection[Any]
Cursor = psycopg.AsyncCursor[Any]


# every new job of a batch, its edges and its history in one statement (one JSON document of
# rows: ragged arrays such as ``depends_on`` travel as JSON arrays)
_INSERT_JOBS = """
WITH v AS (
    SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb) AS v(
        ord int, id text, tenant text, kind text, grp text, args jsonb, priority smallint,
        size bigint, deps text[], labels text[], resources text[], timeout float8,
        max_attempts int, waits bool, submitted float8, topic text, part int, off bigint,
        trigger text, order_key text, workflow text, exclusive text, needs text,
        run_at float8, delay float8)),
ins AS (
    INSERT INTO jobs (id, tenant, kind, group_key, args, priority, size, depends_on, labels,
        resources, timeout_s, max_attempts, state, gate, submitted_at, ready_at, origin_topic,
        origin_partition, origin_offset, trigger, order_key, workflow_id, exclusive, run_at,
        run_after)
    SELECT id, tenant, kind, grp, args, priority, size, deps, labels, resources, timeout,
        max_attempts, CASE WHEN waits THEN 'waiting' ELSE 'ready' END,
        CASE WHEN waits THEN 'dependency' END, to_timestamp(submitted),
        CASE WHEN waits THEN NULL ELSE now() END, topic, part, off, trigger, order_key,
        workflow, exclusive, r.at, r.at
    FROM v, LATERAL (SELECT coalesce(to_timestamp(v.run_at),
                                     now() + make_interval(secs => v.delay)) AS at) r
    ORDER BY ord  -- seq in batch order: strict order follows it
    ON CONFLICT (id) DO NOTHING
    RETURNING id, state),
deps AS (
    INSERT INTO job_deps (job_id, dep_id, needs, kind)
    SELECT DISTINCT v.id, d.dep, v.needs, 'depends_on'
    FROM v JOIN ins ON ins.id = v.id, unnest(v.deps) AS d(dep)
    ON CONFLICT DO NOTHING),
hist AS (
    INSERT INTO job_history (job_id, event, detail)
    SELECT id, 'accepted', jsonb_build_object('state', state) FROM ins)
SELECT id FROM ins
"""


# strict order: each job with an order key waits for the key's latest job before it (by
# ``seq``: an earlier batch's, or an earlier one of this batch); a replay finds the same one
_ORDER_EDGES = """
INSERT INTO job_deps (job_id, dep_id, needs, kind)
SELECT j.id, p.id, 'done', 'order'
FROM jobs j, LATERAL (SELECT o.id FROM jobs o WHERE o.tenant = j.tenant
                      AND o.order_key = j.order_key AND o.seq < j.seq
                      ORDER BY o.seq DESC LIMIT 1) AS p
WHERE j.id = ANY(%s) AND j.order_key IS NOT NULL AND p.id <> ALL(j.depends_on)
ON CONFLICT DO NOTHING
"""


def _insert_row(ord_: int, a: Accepted) -> dict[str, Any]:
    j = a.job
    topic, partition, offset = a.origin
    return {
        "ord": ord_,
        "id": j.id,
        "tenant": j.tenant,
        "kind": j.kind,
        "grp": j.group,
        "args": j.args,
        "priority": j.priority,
        "size": j.size,
        "deps": j.depends_on,
        "labels": j.labels,
        "resources": j.resources,
        "timeout": j.timeout_s,
        "max_attempts": a.max_attempts,
        "waits": bool(j.depends_on or j.order_key),
        "submitted": a.submitted_at,
        "topic": topic,
        "part": partition,
        "off": offset,
        "trigger": j.trigger,
        "order_key": j.order_key,
        "workflow": a.workflow_id,
        "exclusive": j.exclusive,
        "needs": str(Needs.DONE if j.trigger == "all_done" else Needs.SUCCESS),
        "run_at": j.run_at,
        "delay": j.delay_s,  # after acceptance: the insert's now(), as accepted_at
    }


async def queue_inserts(conn: Conn, batch: Sequence[Accepted]) -> Cursor | None:
    """Queue the insertion of new jobs with their edges and history, a fixed number of
    statements whatever the batch (nothing happens for a replay: the job exists, its edges
    too; of one id twice in a batch, the first counts); read with :func:`read_inserted`. The
    batch's dependencies are then read ``FOR SHARE``: a concurrent completion waits for this
    commit."""
    if not batch:
        return None
    firsts = list({a.job.id: a for a in reversed(batch)}.values())[::-1]
    rows = [_insert_row(i, a) for i, a in enumerate(firsts)]
    cur = await conn.execute(_INSERT_JOBS, {"rows": json_rows(rows)})
    ordered = [a.job.id for a in firsts if a.job.order_key]
    if ordered:
        await conn.execute(_ORDER_EDGES, (ordered,))
    await conn.execute(
        "SELECT 1 FROM jobs WHERE id IN (SELECT dep_id FROM job_deps WHERE job_id = ANY(%s))"
        " FOR SHARE",
        ([a.job.id for a in firsts],),
    )
    return cur


async def read_inserted(cur: Cursor | None) -> list[str]:
    """The ids inserted now (not replays), from :func:`queue_inserts`."""
    return [r[0] for r in await cur.fetchall()] if cur is not None else []
