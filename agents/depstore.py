"""The dependency stage's SQL: persist submissions and lifecycle events, load the working
set the dependency core decides on, and write its decisions back, all in the caller's
transaction.

Invariants:
- Inserting is idempotent on job id; edges are stored once (``job_deps``).
- Lifecycle events are guarded by state and attempt (``agents.core.lifecycle``).
- Dependency rows are read ``FOR SHARE`` when a dependent is inserted and a finishing job's
  row is updated before its dependents are read, so a dependent inserted concurrently with its
  dependency's completion is seen by one side or the other (no lost wake-up); the reconciler
  re-settles waiting jobs as a safety net.
- A decision is written with ``WHERE state = 'waiting'``: a job is released or failed once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from agents.admstore import release_holds
from agents.core.deps import Edge, Fail, Needs, Node, Release, Wait
from agents.core.lifecycle import CANCEL_FROM, FINISHED_FROM, STARTED_FROM
from agents.rows import READY_COLS, RETURN_STATE, Accepted, ReadyJob, q, states
from streams.events import JobCancelled, JobEvent, JobFailed, JobStarted, JobSucceeded

Conn = psycopg.AsyncConnection[Any]
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


async def insert_jobs(conn: Conn, batch: Sequence[Accepted]) -> list[str]:
    """Insert new jobs and their edges; return the ids inserted now (not replays)."""
    if not batch:
        return []
    inserted: list[str] = []
    async with conn.cursor() as cur:
        for a in batch:
            j = a.job
            waits = bool(j.depends_on or j.order_key)
            await cur.execute(
                """
                INSERT INTO jobs (id, tenant, kind, group_key, args, priority, size, depends_on,
                    labels, resources, timeout_s, max_attempts, state, gate, submitted_at,
                    ready_at, origin_topic, origin_partition, origin_offset, trigger, order_key,
                    workflow_id, exclusive)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s),
                    CASE WHEN %s THEN NULL ELSE now() END, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (id) DO NOTHING
                RETURNING id
                """,
                (
                    j.id,
                    j.tenant,
                    j.kind,
                    j.group,
                    Jsonb(j.args),
                    j.priority,
                    j.size,
                    list(j.depends_on),
                    list(j.labels),
                    list(j.resources),
                    j.timeout_s,
                    a.max_attempts,
                    "waiting" if waits else "ready",
                    "dependency" if waits else None,
                    a.submitted_at,
                    waits,
                    *a.origin,
                    j.trigger,
                    j.order_key,
                    a.workflow_id,
                    j.exclusive,
                ),
            )
            if await cur.fetchone() is None:
                continue  # a replay: the job exists, its edges too
            inserted.append(j.id)
            needs = Needs.DONE if j.trigger == "all_done" else Needs.SUCCESS
            edges = [(j.id, d, str(needs), "depends_on") for d in dict.fromkeys(j.depends_on)]
            if j.order_key:
                await cur.execute(
                    "SELECT id FROM jobs WHERE tenant = %s AND order_key = %s AND id <> %s "
                    "ORDER BY seq DESC LIMIT 1",
                    (j.tenant, j.order_key, j.id),
                )
                prev = await cur.fetchone()
                if prev is not None and prev[0] not in j.depends_on:
                    edges.append((j.id, prev[0], "done", "order"))
            if edges:
                await cur.executemany(
                    "INSERT INTO job_deps (job_id, dep_id, needs, kind) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    edges,
                )
    if inserted:
        await conn.execute(
            "INSERT INTO job_history (job_id, event, detail) SELECT id, 'accepted', "
            "jsonb_build_object('state', state) FROM jobs WHERE id = ANY(%s)",
            (inserted,),
        )
        # dependencies are read FOR SHARE: a concurrent completion waits for this commit
        await conn.execute(
            "SELECT 1 FROM jobs WHERE id IN (SELECT dep_id FROM job_deps WHERE job_id = ANY(%s))"
            " FOR SHARE",
            (inserted,),
        )
    return inserted


async def apply_lifecycle(
    conn: Conn, events: Sequence[JobEvent], backoff: Mapping[str, tuple[float, float]] | None = None
) -> tuple[list[str], list[ReadyJob]]:
    """Apply events in order; return (jobs that became terminal, jobs back to ready).
    ``backoff``: kind → (base, cap) seconds; a retried attempt n waits min(cap, base·2^(n-1))
    unless its failure was not the job's (``backoff=False``: a lost worker, a hand-back)."""
    terminal: list[str] = []
    retry: list[ReadyJob] = []
    history: list[tuple[str, int, str, Jsonb]] = []
    rows = await _apply_all(conn, events, backoff or {})
    for ev, row in zip(events, rows, strict=True):
        if row is None:
            continue
        state, attempt = row[0], getattr(ev, "attempt", row[1])
        history.append(
            (
                ev.job_id,
                attempt,
                "started" if isinstance(ev, JobStarted) else state,
                Jsonb(_detail(ev)),
            )
        )
        if state in TERMINAL_STATES:
            terminal.append(ev.job_id)
        elif state == "ready":
            retry.append(ReadyJob(ev.job_id, row[2], row[3], row[4]))
    # history and release return nothing: queued, they travel with the caller's next read
    # (``settle_batch``: the working set; a pipeline, so one round trip for all of them)
    if history:
        await conn.execute(
            "INSERT INTO job_history (job_id, attempt, event, detail) "
            "SELECT * FROM unnest(%s::text[], %s::int[], %s::text[], %s::jsonb[])",
            [list(col) for col in zip(*history, strict=True)],
        )
    # an attempt ended (terminal, or back to ready for a retry): give back what it held
    await release_holds(conn, [*terminal, *(r.id for r in retry)])
    return terminal, retry


async def _apply_all(
    conn: Conn, events: Sequence[JobEvent], backoff: Mapping[str, tuple[float, float]]
) -> list[tuple[Any, ...] | None]:
    """Each event's resulting row (state, attempt, tenant, kind, submitted_at) or None when
    it changed nothing. A job's events apply in their order; events of different jobs are
    independent, so the batch goes in generations (a job's first event, its second, …) and
    the starts and successes of a generation each take one set-based UPDATE (the bulk of a
    batch: one statement instead of one per event)."""
    rows: list[tuple[Any, ...] | None] = [None] * len(events)
    seen: dict[str, int] = {}
    generations: dict[int, list[int]] = {}
    for i, ev in enumerate(events):
        g = seen.get(ev.job_id, 0)
        seen[ev.job_id] = g + 1
        generations.setdefault(g, []).append(i)
    for g in sorted(generations):
        bulk: dict[type, list[int]] = {JobStarted: [], JobSucceeded: []}
        for i in generations[g]:
            kind = type(events[i])
            if kind in bulk:
                bulk[kind].append(i)
            else:
                rows[i] = await _apply_one(conn, events[i], backoff)
        for kind, idx in bulk.items():
            if idx:
                by_id = await _apply_bulk(conn, kind, [events[i] for i in idx])
                for i in idx:
                    rows[i] = by_id.get(events[i].job_id)
    return rows


async def _apply_bulk(
    conn: Conn, kind: type, events: Sequence[JobEvent]
) -> dict[str, tuple[Any, ...]]:
    """Starts or successes of distinct jobs in one statement; rows locked in id order."""
    evs = sorted(events, key=lambda e: e.job_id)
    ids = [e.job_id for e in evs]
    attempts = [getattr(e, "attempt", 0) for e in evs]
    at = [e.at for e in evs]
    workers = [getattr(e, "worker", None) for e in evs]
    if kind is JobStarted:
        cur = await conn.execute(
            """UPDATE jobs j SET state = 'running', started_at = to_timestamp(v.at),
                   worker = v.worker, updated_at = now()
               FROM unnest(%s::text[], %s::int[], %s::float8[], %s::text[])
                    AS v(id, attempt, at, worker)
               WHERE j.id = v.id AND j.attempt = v.attempt AND j.state = ANY(%s)
               RETURNING j.id, j.state, j.attempt, j.tenant, j.kind,
                         extract(epoch from j.submitted_at)::float8""",
            (ids, attempts, at, workers, states(STARTED_FROM)),
        )
    else:
        succeeded = [e for e in evs if isinstance(e, JobSucceeded)]
        cur = await conn.execute(
            """UPDATE jobs j SET state = 'succeeded', finished_at = to_timestamp(v.at),
                   started_at = coalesce(j.started_at, to_timestamp(v.at - v.duration)),
                   worker = v.worker, exit_code = v.rc, log_path = v.log, error = NULL,
                   gate = NULL, progress = 1, updated_at = now()
               FROM unnest(%s::text[], %s::int[], %s::float8[], %s::float8[], %s::text[],
                           %s::int[], %s::text[])
                    AS v(id, attempt, at, duration, worker, rc, log)
               WHERE j.id = v.id AND j.attempt = v.attempt AND j.state = ANY(%s)
               RETURNING j.id, j.state, j.attempt, j.tenant, j.kind,
                         extract(epoch from j.submitted_at)::float8""",
            (
                ids,
                attempts,
                at,
                [e.duration_s for e in succeeded],
                workers,
                [e.exit_code for e in succeeded],
                [e.log_path for e in succeeded],
                states(FINISHED_FROM),
            ),
        )
    return {r[0]: tuple(r[1:]) for r in await cur.fetchall()}


async def _apply_one(
    conn: Conn, ev: JobEvent, backoff: Mapping[str, tuple[float, float]]
) -> tuple[Any, ...] | None:
    if isinstance(ev, JobStarted):
        cur = await conn.execute(
            q(
                """UPDATE jobs SET state = 'running', started_at = to_timestamp(%s), worker = %s,
                updated_at = now()
            WHERE id = %s AND attempt = %s AND state = ANY(%s) {ret}""",
                ret=RETURN_STATE,
            ),
            (ev.at, ev.worker, ev.job_id, ev.attempt, states(STARTED_FROM)),
        )
    elif isinstance(ev, JobSucceeded):
        cur = await conn.execute(
            q(
                """UPDATE jobs SET state = 'succeeded', finished_at = to_timestamp(%s),
                started_at = coalesce(started_at, to_timestamp(%s)), worker = %s, exit_code = %s,
                log_path = %s, error = NULL, gate = NULL, progress = 1, updated_at = now()
            WHERE id = %s AND attempt = %s AND state = ANY(%s) {ret}""",
                ret=RETURN_STATE,
            ),
            (
                ev.at,
                ev.at - ev.duration_s,
                ev.worker,
                ev.exit_code,
                ev.log_path,
                ev.job_id,
                ev.attempt,
                states(FINISHED_FROM),
            ),
        )
    elif isinstance(ev, JobFailed):
        cur = await conn.execute(
            q(
                """UPDATE jobs SET
                state = CASE WHEN %(r)s AND attempt < max_attempts + %(x)s
                             THEN 'ready' ELSE 'failed' END,
                gate = CASE WHEN %(r)s AND attempt < max_attempts + %(x)s THEN 'retry' END,
                run_after = CASE WHEN %(r)s AND %(b)s AND attempt < max_attempts + %(x)s
                    THEN now() + make_interval(secs => least(
                        coalesce((%(bo)s::jsonb -> kind ->> 1)::float8, 300),
                        coalesce((%(bo)s::jsonb -> kind ->> 0)::float8, 1)
                            * power(2, least(attempt, 30) - 1)))
                    END,
                max_attempts = max_attempts + %(x)s,
                ready_at = now(), finished_at = to_timestamp(%(at)s), worker = %(w)s,
                exit_code = %(rc)s, error = %(err)s, log_path = %(log)s, progress = NULL,
                updated_at = now()
            WHERE id = %(id)s AND attempt = %(a)s AND state = ANY(%(from)s) {ret}""",
                ret=RETURN_STATE,
            ),
            {
                "r": ev.retryable,
                "x": 0 if ev.counts else 1,
                "b": ev.backoff,
                "bo": Jsonb(backoff),
                "at": ev.at,
                "w": ev.worker,
                "rc": ev.exit_code,
                "err": ev.error[:4000],
                "log": ev.log_path,
                "id": ev.job_id,
                "a": ev.attempt,
                "from": states(FINISHED_FROM),
            },
        )
    elif isinstance(ev, JobCancelled):
        cur = await conn.execute(
            q(
                """UPDATE jobs SET state = 'cancelled', finished_at = to_timestamp(%s), error = %s,
                gate = NULL, updated_at = now()
            WHERE id = %s AND state = ANY(%s) {ret}""",
                ret=RETURN_STATE,
            ),
            (ev.at, ev.reason or "cancelled", ev.job_id, states(CANCEL_FROM)),
        )
    else:  # pragma: no cover - the union is exhaustive
        return None
    return await cur.fetchone()


def _detail(ev: JobEvent) -> dict[str, Any]:
    if isinstance(ev, JobFailed):
        return {"worker": ev.worker, "error": ev.error[:500], "exit_code": ev.exit_code}
    if isinstance(ev, JobSucceeded):
        return {"worker": ev.worker, "duration_s": ev.duration_s}
    if isinstance(ev, JobStarted):
        return {"worker": ev.worker}
    return {"reason": ev.reason}


async def load_working_set(conn: Conn, changed: Sequence[str]) -> list[Node]:
    """``changed`` jobs, their waiting dependents transitively (with their edges), and every
    job those wait on (as leaves: state, tenant and root cause), in one statement."""
    if not changed:
        return []
    cur = await conn.execute(
        """
        WITH RECURSIVE down(id) AS (
            SELECT unnest(%s::text[])
            UNION
            SELECT d.job_id FROM job_deps d JOIN down ON d.dep_id = down.id
            JOIN jobs w ON w.id = d.job_id AND w.state = 'waiting'
        ),
        nodes AS (
            SELECT j.id, j.state, extract(epoch from j.accepted_at)::float8 AS at,
                   j.root_cause, j.tenant,
                   coalesce(array_agg(d.dep_id ORDER BY d.dep_id)
                            FILTER (WHERE d.dep_id IS NOT NULL), '{}') AS deps,
                   coalesce(array_agg(d.needs ORDER BY d.dep_id)
                            FILTER (WHERE d.dep_id IS NOT NULL), '{}') AS needs
            FROM jobs j LEFT JOIN job_deps d ON d.job_id = j.id AND j.state = 'waiting'
            WHERE j.id IN (SELECT id FROM down)
            GROUP BY j.id
        )
        SELECT id, state, at, root_cause, tenant, deps, needs, false FROM nodes
        UNION ALL
        SELECT l.id, l.state, 0::float8, l.root_cause, l.tenant, '{}', '{}', true
        FROM jobs l
        WHERE l.id IN (SELECT unnest(deps) FROM nodes) AND l.id NOT IN (SELECT id FROM nodes)
        """,
        (list(changed),),
    )
    nodes: list[Node] = []
    for jid, state, at, root, tenant, deps, needs, leaf in await cur.fetchall():
        edges = () if leaf else tuple(Edge(d, Needs(n)) for d, n in zip(deps, needs, strict=True))
        nodes.append(Node(jid, state, edges, at, root, tenant))
    return nodes


async def apply_decisions(
    conn: Conn,
    decisions: Sequence[Release | Fail | Wait],
    ready_of: tuple[Sequence[str], Sequence[str]] | None = None,
) -> list[ReadyJob]:
    """Write decisions guarded by ``state = 'waiting'``; return the jobs released now, and
    with ``ready_of`` (ids, dependents of) also :func:`ready_among` those, read in the same
    round trip (every statement is queued before the first result is read)."""
    released = [d.job for d in decisions if isinstance(d, Release)]
    failed = [d for d in decisions if isinstance(d, Fail)]
    waits = [d for d in decisions if isinstance(d, Wait)]
    unlocked = None
    if released:
        unlocked = await conn.execute(
            q(
                """WITH r AS (
                    UPDATE jobs SET state = 'ready', gate = NULL, ready_at = now(),
                        updated_at = now()
                    WHERE id = ANY(%s) AND state = 'waiting' RETURNING *),
                h AS (INSERT INTO job_history (job_id, event) SELECT id, 'unlocked' FROM r)
                SELECT {cols} FROM r""",
                cols=READY_COLS,
            ),
            (released,),
        )
    if failed:
        await conn.execute(
            """
            WITH f AS (SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])
                       AS f(id, root, reason)),
            changed AS (
                UPDATE jobs j SET state = 'failed', gate = NULL, finished_at = now(),
                    updated_at = now(), root_cause = f.root, error = f.reason
                FROM f WHERE j.id = f.id AND j.state = 'waiting'
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
    also = await _ready_among(conn, *ready_of) if ready_of else None
    ready = [ReadyJob(*r) for r in await unlocked.fetchall()] if unlocked is not None else []
    if also is not None:
        ready += [ReadyJob(*r) for r in await also.fetchall()]
    return ready


async def ready_among(
    conn: Conn, ids: Sequence[str], dependents_of: Sequence[str] = ()
) -> list[ReadyJob]:
    """Jobs among ``ids`` or the dependents of ``dependents_of`` that are ready: after a replay
    they may have been released without being forwarded."""
    cur = await _ready_among(conn, ids, dependents_of)
    return [] if cur is None else [ReadyJob(*r) for r in await cur.fetchall()]


async def _ready_among(
    conn: Conn, ids: Sequence[str], dependents_of: Sequence[str] = ()
) -> psycopg.AsyncCursor[Any] | None:
    if not ids and not dependents_of:
        return None
    return await conn.execute(
        q(
            """SELECT {cols} FROM jobs WHERE state = 'ready' AND (id = ANY(%s)
           OR id IN (SELECT job_id FROM job_deps WHERE dep_id = ANY(%s)))""",
            cols=READY_COLS,
        ),
        (list(ids), list(dependents_of)),
    )
