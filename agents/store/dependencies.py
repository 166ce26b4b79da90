"""The dependency stage's SQL: load the working set the dependency core decides on and write
its decisions back, in the caller's transaction (submissions are persisted by
``agents.store.inserts``, lifecycle events by ``agents.store.lifecycle``).

Invariants:
- Edges are stored once (``job_deps``); lifecycle events are guarded by state and attempt
  (``agents.core.lifecycle``); ``job.cancelled`` is an announcement (the control stage applied
  it: ``agents.store.commands``).
- Dependency rows are read ``FOR SHARE`` when a dependent is inserted and a finishing job's
  row is locked before its dependents are read, so a dependent inserted concurrently with its
  dependency's completion is seen by one side or the other (no lost wake-up); the reconciler
  re-settles waiting jobs as a safety net.
- A decision is written with ``WHERE state = 'waiting'``: a job is released or failed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from agents.core.deps import Edge, Fail, Needs, Node, Release, Wait
from agents.store.rows import READY_COLS, ReadyJob, q

Conn = psycopg.AsyncConnection[Any]
Cursor = psycopg.AsyncCursor[Any]


async def load_working_set(conn: Conn, changed: Sequence[str]) -> list[Node]:
    """``changed`` jobs, their waiting dependents transitively (with their edges), and every
    job those wait on (as leaves: state, tenant and root cause), in one statement."""
    return await read_working_set(await queue_working_set(conn, changed))


async def queue_working_set(conn: Conn, changed: Sequence[str]) -> Cursor | None:
    """Queue :func:`load_working_set`'s statement; read with :func:`read_working_set`."""
    if not changed:
        return None
    return await conn.execute(
        """
        WITH RECURSIVE down(id) AS (
            SELECT unnest(%s::text[])
            UNION
            SELECT d.job_id FROM job_deps d JOIN down ON d.dep_id = down.id
            JOIN jobs w ON w.id = d.job_id AND (w.state = 'waiting') IS TRUE
        ),
        nodes AS (
            SELECT j.id, j.state, extract(epoch from j.accepted_at)::float8 AS at,
                   j.root_cause, j.tenant, j.workflow_id IS NOT NULL AS closed,
                   coalesce(array_agg(d.dep_id ORDER BY d.dep_id)
                            FILTER (WHERE d.dep_id IS NOT NULL), '{}') AS deps,
                   coalesce(array_agg(d.needs ORDER BY d.dep_id)
                            FILTER (WHERE d.dep_id IS NOT NULL), '{}') AS needs
            FROM jobs j LEFT JOIN job_deps d ON d.job_id = j.id AND j.state = 'waiting'
            WHERE j.id = ANY(ARRAY(SELECT id FROM down))  -- by primary key, whatever the plan
            GROUP BY j.id
        )
        SELECT id, state, at, root_cause, tenant, deps, needs, false, closed FROM nodes
        UNION ALL
        SELECT l.id, l.state, 0::float8, l.root_cause, l.tenant, '{}', '{}', true, false
        FROM jobs l
        WHERE l.id = ANY(ARRAY(SELECT unnest(deps) FROM nodes))
          AND l.id <> ALL(ARRAY(SELECT id FROM nodes))
        """,
        (list(changed),),
    )


async def read_working_set(cur: Cursor | None) -> list[Node]:
    if cur is None:
        return []
    nodes: list[Node] = []
    for jid, state, at, root, tenant, deps, needs, leaf, closed in await cur.fetchall():
        edges = () if leaf else tuple(Edge(d, Needs(n)) for d, n in zip(deps, needs, strict=True))
        nodes.append(Node(jid, state, edges, at, root, tenant, closed))
    return nodes


# the jobs among some ids, or among the dependents of others, that are ready: after a replay
# they may have been released without being forwarded (states tested as filters on rows found
# by id: see ``agents.store.admission``)
_READY_AMONG = """SELECT {cols} FROM jobs WHERE id = ANY(%s) AND (state = 'ready') IS TRUE
    UNION ALL
    SELECT {cols} FROM jobs WHERE id = ANY(ARRAY(SELECT job_id FROM job_deps
                                                 WHERE dep_id = ANY(%s)))
        AND id <> ALL(%s) AND (state = 'ready') IS TRUE"""
_UNLOCK = """WITH r AS (
        UPDATE jobs SET state = 'ready', gate = NULL, ready_at = now(), updated_at = now()
        WHERE id = ANY(%s) AND (state = 'waiting') IS TRUE RETURNING *),
    h AS (INSERT INTO job_history (job_id, event) SELECT id, 'unlocked' FROM r)
    SELECT {cols} FROM r"""


async def apply_decisions(
    conn: Conn,
    decisions: Sequence[Release | Fail | Wait],
    ready_of: tuple[Sequence[str], Sequence[str]] | None = None,
) -> list[ReadyJob]:
    """Write decisions guarded by ``state = 'waiting'``; return the jobs released now, and
    with ``ready_of`` (ids, dependents of) also the jobs already ready among those, read in
    the same round trip (every statement is queued before the first result is read)."""
    return await read_ready(await queue_decisions(conn, decisions, ready_of))


async def queue_decisions(
    conn: Conn,
    decisions: Sequence[Release | Fail | Wait],
    ready_of: tuple[Sequence[str], Sequence[str]] | None = None,
) -> list[Cursor]:
    """Queue :func:`apply_decisions`'s statements; :func:`read_ready` reads what they
    return, also after the transaction's COMMIT went in the same round trip."""
    released = [d.job for d in decisions if isinstance(d, Release)]
    failed = [d for d in decisions if isinstance(d, Fail)]
    waits = [d for d in decisions if isinstance(d, Wait)]
    ids, deps_of = ready_of or ((), ())
    among = (list(ids), list(deps_of), list(ids)) if ids or deps_of else None
    reads: list[Cursor] = []
    if released:
        # with the jobs already ready among ``ready_of`` in the same statement (its snapshot
        # predates its own release, so none comes twice)
        text = _UNLOCK if among is None else _UNLOCK + "\nUNION ALL\n" + _READY_AMONG
        reads.append(await conn.execute(q(text, cols=READY_COLS), (released, *(among or ()))))
    elif among is not None:
        reads.append(await conn.execute(q(_READY_AMONG, cols=READY_COLS), among))
    if failed:
        await conn.execute(
            """
            WITH f AS (SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])
                       AS f(id, root, reason)),
            changed AS (
                UPDATE jobs j SET state = 'failed', gate = NULL, finished_at = now(),
                    updated_at = now(), root_cause = f.root, error = f.reason
                FROM f WHERE j.id = f.id AND (j.state = 'waiting') IS TRUE
                RETURNING j.id, f.root, f.reason)
            INSERT INTO job_history (job_id, event, detail)
            SELECT id, 'failed', jsonb_build_object('reason', reason, 'root_cause', root)
            FROM changed
            """,
            ([d.job for d in failed], [d.root for d in failed], [d.reason for d in failed]),
        )
    if waits:
        await conn.execute(
            """UPDATE jobs j SET gate = w.gate FROM unnest(%s::text[], %s::text[]) AS w(id, gate)
            WHERE j.id = w.id AND j.state = 'waiting' AND j.gate IS DISTINCT FROM w.gate""",
            ([w.job for w in waits], [w.gate for w in waits]),
        )
    return reads


async def read_ready(cursors: Sequence[Cursor]) -> list[ReadyJob]:
    """The ready jobs the queued reads return."""
    return [ReadyJob(*r) for cur in cursors for r in await cur.fetchall()]
