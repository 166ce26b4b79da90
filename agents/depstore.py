"""The dependency stage's SQL: persist submissions and lifecycle events, load the working
set the dependency core decides on, and write its decisions back, all in the caller's
transaction.

Invariants:
- Inserting is idempotent on job id; edges are stored once (``job_deps``).
- Lifecycle events are guarded by state and attempt (``agents.core.lifecycle``);
  ``job.cancelled`` is an announcement (the control stage applied it: ``agents.ctlstore``).
- Dependency rows are read ``FOR SHARE`` when a dependent is inserted and a finishing job's
  row is updated before its dependents are read, so a dependent inserted concurrently with its
  dependency's completion is seen by one side or the other (no lost wake-up); the reconciler
  re-settles waiting jobs as a safety net.
- A decision is written with ``WHERE state = 'waiting'``: a job is released or failed once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psycopg
from psycopg.types.json import Jsonb

from agents.admstore import release_attempt_holds
from agents.core.deps import Edge, Fail, Needs, Node, Release, Wait
from agents.core.lifecycle import FINISHED_FROM, STARTED_FROM, UNSTARTED_FROM
from agents.rows import READY_COLS, RETURN_STATE, Accepted, ReadyJob, q, states
from streams.events import JobCancelled, JobEvent, JobFailed, JobStarted, JobSucceeded

Conn = psycopg.AsyncConnection[Any]
Cursor = psycopg.AsyncCursor[Any]
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


# every new job of a batch, its edges and its history in one statement (one JSON document of
# rows: ragged arrays such as ``depends_on`` travel as JSON arrays)
_INSERT_JOBS = """
WITH v AS (
    SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb) AS v(
        ord int, id text, tenant text, kind text, grp text, args jsonb, priority smallint,
        size bigint, deps text[], labels text[], resources text[], timeout float8,
        max_attempts int, waits bool, submitted float8, topic text, part int, off bigint,
        trigger text, order_key text, workflow text, exclusive text, needs text)),
ins AS (
    INSERT INTO jobs (id, tenant, kind, group_key, args, priority, size, depends_on, labels,
        resources, timeout_s, max_attempts, state, gate, submitted_at, ready_at, origin_topic,
        origin_partition, origin_offset, trigger, order_key, workflow_id, exclusive)
    SELECT id, tenant, kind, grp, args, priority, size, deps, labels, resources, timeout,
        max_attempts, CASE WHEN waits THEN 'waiting' ELSE 'ready' END,
        CASE WHEN waits THEN 'dependency' END, to_timestamp(submitted),
        CASE WHEN waits THEN NULL ELSE now() END, topic, part, off, trigger, order_key,
        workflow, exclusive
    FROM v ORDER BY ord  -- seq in batch order: strict order follows it
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
    cur = await conn.execute(_INSERT_JOBS, {"rows": msgspec.json.encode(rows).decode()})
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


@dataclass(slots=True)
class _Queued:
    """A lifecycle statement in the pipeline, read after the sync: the events it applies,
    and the one event when it is not a bulk statement (a bulk one writes its history rows
    itself)."""

    idx: list[int]
    cur: Cursor
    single: JobFailed | None = None


@dataclass(slots=True)
class Ended:
    """What a batch's lifecycle events did: attempts that ended (terminal, or back to ready
    for a retry) and the history rows to write."""

    terminal: list[str]
    retry: list[ReadyJob]
    history: list[tuple[str, int, str, Jsonb]]
    # attempts whose end was reported: what they hold is given back, whether the report
    # changed the job or was fenced off (a cancelled attempt that stopped, a superseded one)
    over: list[tuple[str, int]] = field(default_factory=list)
    # reported starts that changed nothing (a repeat, or an attempt already over)
    unapplied_starts: list[tuple[str, int]] = field(default_factory=list)


async def queue_lifecycle(
    conn: Conn, events: Sequence[JobEvent], backoff: Mapping[str, tuple[float, float]] | None = None
) -> list[_Queued]:
    """Queue every event's guarded transition (read with :func:`read_lifecycle`). A job's
    events apply in their order; events of different jobs are independent, so the batch goes
    in generations (a job's first event, its second, …) and the starts and successes of a
    generation each take one set-based UPDATE (the bulk of a batch: one statement instead of
    one per event). ``backoff``: kind → (base, cap) seconds; a retried attempt n waits
    min(cap, base·2^(n-1)) unless its failure was not the job's (``backoff=False``: a lost
    worker, a hand-back)."""
    queued: list[_Queued] = []
    seen: dict[str, int] = {}
    generations: dict[int, list[int]] = {}
    for i, ev in enumerate(events):
        if isinstance(ev, JobCancelled):
            continue  # an announcement: the control stage applied the cancel
        g = seen.get(ev.job_id, 0)
        seen[ev.job_id] = g + 1
        generations.setdefault(g, []).append(i)
    for g in sorted(generations):
        bulk: dict[type, list[int]] = {JobStarted: [], JobSucceeded: []}
        for i in generations[g]:
            ev = events[i]
            if isinstance(ev, JobFailed):
                queued.append(_Queued([i], await _apply_failed(conn, ev, backoff or {}), ev))
            else:
                bulk[type(ev)].append(i)
        for kind, idx in bulk.items():
            if idx:
                cur = await _apply_bulk(conn, kind, [events[i] for i in idx])
                queued.append(_Queued(idx, cur))
    return queued


async def read_lifecycle(events: Sequence[JobEvent], queued: Sequence[_Queued]) -> Ended:
    """Each event's resulting row (state, attempt, tenant, kind, submitted_at), or none when
    it changed nothing (a duplicate, a stale attempt), summed up."""
    rows: list[tuple[Any, ...] | None] = [None] * len(events)
    ended = Ended([], [], [])
    for qd in queued:
        one = qd.single
        if one is None:
            by_id = {r[0]: tuple(r[1:]) for r in await qd.cur.fetchall()}
            for i in qd.idx:
                rows[i] = by_id.get(events[i].job_id)
        elif (row := await qd.cur.fetchone()) is not None:
            rows[qd.idx[0]] = row
            attempt = getattr(one, "attempt", row[1])
            ended.history.append((one.job_id, attempt, row[0], Jsonb(_detail(one))))
    for ev, row in zip(events, rows, strict=True):
        if isinstance(ev, JobSucceeded) or (
            # a hand-back the attempt's recorded start won ends nothing: it runs on
            isinstance(ev, JobFailed) and not ev.keeps_holds and not (ev.unstarted and row is None)
        ):
            ended.over.append((ev.job_id, ev.attempt))
        if row is None:
            if isinstance(ev, JobStarted):
                ended.unapplied_starts.append((ev.job_id, ev.attempt))
            continue
        state = row[0]
        if state in TERMINAL_STATES:
            ended.terminal.append(ev.job_id)
        elif state == "ready":
            ended.retry.append(ReadyJob(ev.job_id, row[2], row[3], row[4]))
    return ended


async def queue_ended(conn: Conn, ended: Ended) -> None:
    """The history rows, and what the ended attempts held given back (nothing to read)."""
    if ended.history:
        await conn.execute(
            "INSERT INTO job_history (job_id, attempt, event, detail) "
            "SELECT * FROM unnest(%s::text[], %s::int[], %s::text[], %s::jsonb[])",
            [list(col) for col in zip(*ended.history, strict=True)],
        )
    await release_attempt_holds(conn, ended.over)


async def _apply_bulk(conn: Conn, kind: type, events: Sequence[JobEvent]) -> Cursor:
    """Starts or successes of distinct jobs, with their history rows, in one statement; rows
    locked in id order."""
    evs = sorted(events, key=lambda e: e.job_id)
    ids = [e.job_id for e in evs]
    attempts = [getattr(e, "attempt", 0) for e in evs]
    at = [e.at for e in evs]
    workers = [getattr(e, "worker", None) for e in evs]
    if kind is JobStarted:
        cur = await conn.execute(
            """WITH u AS (
                UPDATE jobs j SET state = 'running', started_at = to_timestamp(v.at),
                    worker = v.worker, updated_at = now()
                FROM unnest(%s::text[], %s::int[], %s::float8[], %s::text[])
                     AS v(id, attempt, at, worker)
                WHERE j.id = v.id AND j.attempt = v.attempt AND j.state = ANY(%s)
                RETURNING j.id, j.state, j.attempt, j.tenant, j.kind,
                          extract(epoch from j.submitted_at)::float8 AS submitted, v.worker),
            h AS (INSERT INTO job_history (job_id, attempt, event, detail)
                  SELECT id, attempt, 'started', jsonb_build_object('worker', worker) FROM u)
            SELECT id, state, attempt, tenant, kind, submitted FROM u""",
            (ids, attempts, at, workers, states(STARTED_FROM)),
        )
    else:
        succeeded = [e for e in evs if isinstance(e, JobSucceeded)]
        cur = await conn.execute(
            """WITH u AS (
                UPDATE jobs j SET state = 'succeeded', finished_at = to_timestamp(v.at),
                    started_at = coalesce(j.started_at, to_timestamp(v.at - v.duration)),
                    worker = v.worker, exit_code = v.rc, log_path = v.log, error = NULL,
                    gate = NULL, progress = 1, updated_at = now()
                FROM unnest(%s::text[], %s::int[], %s::float8[], %s::float8[], %s::text[],
                            %s::int[], %s::text[])
                     AS v(id, attempt, at, duration, worker, rc, log)
                WHERE j.id = v.id AND j.attempt = v.attempt AND j.state = ANY(%s)
                RETURNING j.id, j.state, j.attempt, j.tenant, j.kind,
                          extract(epoch from j.submitted_at)::float8 AS submitted, v.worker,
                          v.duration),
            h AS (INSERT INTO job_history (job_id, attempt, event, detail)
                  SELECT id, attempt, 'succeeded',
                         jsonb_build_object('worker', worker, 'duration_s', duration) FROM u)
            SELECT id, state, attempt, tenant, kind, submitted FROM u""",
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
    return cur


async def _apply_failed(
    conn: Conn, ev: JobFailed, backoff: Mapping[str, tuple[float, float]]
) -> Cursor:
    """A failure (starts and successes go in bulk: :func:`_apply_bulk`)."""
    return await conn.execute(
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
            ready_at = now(), finished_at = to_timestamp(%(at)s), worker = nullif(%(w)s, ''),
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
            "from": states(UNSTARTED_FROM if ev.unstarted else FINISHED_FROM),
        },
    )


def _detail(ev: JobFailed) -> dict[str, Any]:
    return {"worker": ev.worker, "error": ev.error[:500], "exit_code": ev.exit_code}


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


async def read_working_set(cur: Cursor | None) -> list[Node]:
    if cur is None:
        return []
    nodes: list[Node] = []
    for jid, state, at, root, tenant, deps, needs, leaf in await cur.fetchall():
        edges = () if leaf else tuple(Edge(d, Needs(n)) for d, n in zip(deps, needs, strict=True))
        nodes.append(Node(jid, state, edges, at, root, tenant))
    return nodes


# the jobs among some ids, or among the dependents of others, that are ready: after a replay
# they may have been released without being forwarded
_READY_AMONG = """SELECT {cols} FROM jobs WHERE state = 'ready' AND (id = ANY(%s)
    OR id IN (SELECT job_id FROM job_deps WHERE dep_id = ANY(%s)))"""
_UNLOCK = """WITH r AS (
        UPDATE jobs SET state = 'ready', gate = NULL, ready_at = now(), updated_at = now()
        WHERE id = ANY(%s) AND state = 'waiting' RETURNING *),
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
    among = (list(ids), list(deps_of)) if ids or deps_of else None
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
    return reads


async def read_ready(cursors: Sequence[Cursor]) -> list[ReadyJob]:
    """The ready jobs the queued reads return."""
    return [ReadyJob(*r) for cur in cursors for r in await cur.fetchall()]
