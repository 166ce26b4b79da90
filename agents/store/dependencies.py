"""The dependency stage's SQL: persist submissions and lifecycle events, load the working
set the dependency core decides on, and write its decisions back, all in the caller's
transaction.

Invariants:
- Inserting is idempotent on job id; edges are stored once (``job_deps``).
- Lifecycle events are guarded by state and attempt (``agents.core.lifecycle``);
  ``job.cancelled`` is an announcement (the control stage applied it: ``agents.store.commands``).
- Dependency rows are read ``FOR SHARE`` when a dependent is inserted and a finishing job's
  row is locked before its dependents are read, so a dependent inserted concurrently with its
  dependency's completion is seen by one side or the other (no lost wake-up); the reconciler
  re-settles waiting jobs as a safety net.
- A decision is written with ``WHERE state = 'waiting'``: a job is released or failed once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from agents.core.deps import Edge, Fail, Needs, Node, Release, Wait
from agents.core.lifecycle import (
    TERMINAL,
    Backoff,
    Change,
    Event,
    Failed,
    Job,
    Started,
    State,
    Succeeded,
    fold,
    start_is_stale,
)
from agents.store.admission import AdmitResult, CyclePlan, release_attempt_holds
from agents.store.rows import READY_COLS, Accepted, ReadyJob, json_rows, q
from streams.events import JobCancelled, JobEvent, JobFailed, JobStarted, JobSucceeded

Conn = psycopg.AsyncConnection[Any]
Cursor = psycopg.AsyncCursor[Any]
DEFAULT_BACKOFF = Backoff()


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


@dataclass(slots=True)
class Ended:
    """What a batch's lifecycle events did: attempts that ended (terminal, or back to ready
    for a retry), the jobs' new states, the rows to write."""

    terminal: list[str]
    retry: list[ReadyJob]
    history: list[tuple[str, int, str, dict[str, Any]]]  # job, attempt, event, detail
    # attempts whose end was reported: what they hold is given back, whether the report
    # changed the job or was fenced off (a cancelled attempt that stopped, a superseded one)
    over: list[tuple[str, int]] = field(default_factory=list)
    # reported starts of attempts already over whose process may run (``start_is_stale``)
    stale_starts: list[tuple[str, int]] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)  # job → its state after the batch
    writes: list[dict[str, Any]] = field(default_factory=list)  # one row update per job
    durations: list[tuple[str, float]] = field(default_factory=list)  # (kind, s) of successes


@dataclass(frozen=True, slots=True)
class Settled:
    """What a dependency batch's transaction did, for the stage to carry out."""

    ready: list[ReadyJob]  # jobs now ready (without a plan: to forward to their owner)
    rejected: list[Fail]  # submissions of the batch that can never run
    stale_starts: list[tuple[str, int]]  # started attempts already over (to stop)
    durations: list[tuple[str, float]]  # (kind, seconds) of the successes recorded
    released: bool = False  # attempts ended: their holds were given back
    # admission in the same transaction (``CyclePlanner``): what it planned (its
    # ``forward``: the ready jobs for other owners), what it did
    plan: CyclePlan | None = None
    admitted: AdmitResult | None = None


@dataclass(frozen=True, slots=True)
class _Row:
    job: Job
    kind: str
    tenant: str
    submitted_at: float


def _lifecycle_ids(events: Sequence[JobEvent]) -> list[str]:
    return sorted({e.job_id for e in events if not isinstance(e, JobCancelled)})


async def queue_lifecycle(conn: Conn, events: Sequence[JobEvent]) -> Cursor | None:
    """Queue the read of the rows a batch's lifecycle events touch, locked in id order (the
    core decides on them: :func:`decide_lifecycle`). ``job.cancelled`` is an announcement:
    the control stage applied the cancel."""
    ids = _lifecycle_ids(events)
    if not ids:
        return None
    return await conn.execute(
        "SELECT id, state, attempt, max_attempts, kind, tenant,"
        " extract(epoch from submitted_at)::float8 FROM jobs WHERE id = ANY(%s)"
        " ORDER BY id FOR UPDATE",
        (ids,),
    )


def _core_event(ev: JobEvent) -> Event:
    if isinstance(ev, JobStarted):
        return Started(ev.attempt)
    if isinstance(ev, JobSucceeded):
        return Succeeded(ev.attempt)
    assert isinstance(ev, JobFailed)
    return Failed(ev.attempt, ev.retryable, ev.counts, ev.unstarted, ev.backoff)


def _history(ev: JobEvent, state: State) -> tuple[str, int, str, dict[str, Any]]:
    detail: dict[str, Any]
    if isinstance(ev, JobStarted):
        name, detail = "started", {"worker": ev.worker}
    elif isinstance(ev, JobSucceeded):
        name, detail = "succeeded", {"worker": ev.worker, "duration_s": ev.duration_s}
    else:
        assert isinstance(ev, JobFailed)
        name = str(state)  # ready (to be retried) or failed
        detail = {"worker": ev.worker, "error": ev.error[:500], "exit_code": ev.exit_code}
    return ev.job_id, ev.attempt, name, detail


def _write(change: Change, events: Sequence[JobEvent]) -> dict[str, Any]:
    """The row update of one job whose events applied: the columns the last one sets, and
    the start time from a start of this batch (else kept; a success without a recorded start
    started ``duration_s`` before it ended)."""
    applied = [e for i in change.applied if not isinstance(e := events[i], JobCancelled)]
    last = applied[-1]
    start = next((e for e in applied if isinstance(e, JobStarted)), None)
    row: dict[str, Any] = {
        "id": last.job_id,
        "was": str(change.before.state),
        "attempt": change.before.attempt,
        "state": str(change.after.state),
        "max_attempts": change.after.max_attempts,
        "started": start.at if start is not None else None,
        "start_known": start is not None,
        "outcome": None,
        "worker": last.worker or None,
    }
    if isinstance(last, JobSucceeded):
        if start is None:
            row["started"] = last.at - last.duration_s
        row.update(outcome="succeeded", finished=last.at, rc=last.exit_code, log=last.log_path)
        row.update(error=None, gate=None, progress=1.0)
    elif isinstance(last, JobFailed):
        retry = change.after.state is State.READY
        row.update(outcome="failed", finished=last.at, rc=last.exit_code, log=last.log_path)
        row.update(error=last.error[:4000], gate="retry" if retry else None, progress=None)
        row["run_after"] = change.run_after
    return row


async def decide_lifecycle(
    events: Sequence[JobEvent], cur: Cursor | None, backoff: Mapping[str, Backoff], now: float
) -> Ended:
    """Read the locked rows (:func:`queue_lifecycle`) and let the core fold each job's
    events (``agents.core.lifecycle.fold``): the row updates, history, ended attempts and
    stale starts of the batch."""
    rows: dict[str, _Row] = {}
    if cur is not None:
        for jid, state, attempt, max_attempts, kind, tenant, submitted in await cur.fetchall():
            rows[jid] = _Row(Job(State(state), attempt, max_attempts), kind, tenant, submitted)
    by_job: dict[str, list[tuple[int, Event]]] = {}
    for i, ev in enumerate(events):
        if not isinstance(ev, JobCancelled):
            by_job.setdefault(ev.job_id, []).append((i, _core_event(ev)))
    ended = Ended([], [], [])
    applied: set[int] = set()
    after: dict[str, Job] = {}  # each job after the batch (unchanged ones: as read)
    for jid, evs in by_job.items():
        row = rows.get(jid)
        if row is None:
            continue  # an unknown job: nothing to change
        change = fold(row.job, evs, backoff.get(row.kind, DEFAULT_BACKOFF), now)
        after[jid] = change.after
        if not change.changed:
            continue
        applied.update(change.applied)
        ended.writes.append(_write(change, events))
        ended.states[jid] = str(change.after.state)
        for i, state in zip(change.applied, change.states, strict=True):
            ended.history.append(_history(events[i], state))
            if isinstance(ev := events[i], JobSucceeded):
                ended.durations.append((row.kind, ev.duration_s))
        if change.after.state in TERMINAL:
            ended.terminal.append(jid)
        elif change.after.state is State.READY:
            ended.retry.append(ReadyJob(jid, row.tenant, row.kind, row.submitted_at))
    for i, ev in enumerate(events):
        if isinstance(ev, JobCancelled):
            continue
        if isinstance(ev, JobSucceeded) or (
            # a hand-back the attempt's recorded start won ends nothing: it runs on
            isinstance(ev, JobFailed)
            and not ev.keeps_holds
            and not (ev.unstarted and i not in applied)
        ):
            ended.over.append((ev.job_id, ev.attempt))
        if (
            isinstance(ev, JobStarted)
            and i not in applied
            and ev.job_id in after
            and start_is_stale(after[ev.job_id], ev.attempt)
        ):
            ended.stale_starts.append((ev.job_id, ev.attempt))
    return ended


# the decided row updates, guarded by the state and attempt they were decided on (the rows
# are locked: the guard holds unless another writer ignored the lock)
_WRITE_LIFECYCLE = """
WITH v AS (
    SELECT * FROM jsonb_to_recordset(%s::jsonb) AS v(
        id text, was text, attempt int, state text, max_attempts int, started float8,
        start_known bool, outcome text, worker text, finished float8, rc int, log text,
        error text, gate text, progress float8, run_after float8))
UPDATE jobs j SET
    state = v.state,
    max_attempts = v.max_attempts,
    started_at = CASE WHEN v.start_known THEN to_timestamp(v.started)
                      ELSE coalesce(j.started_at, to_timestamp(v.started)) END,
    worker = v.worker,
    -- a recorded start proves the dispatch reached the broker
    dispatch_confirmed = j.dispatch_confirmed OR v.start_known,
    finished_at = CASE WHEN v.outcome IS NULL THEN j.finished_at
                       ELSE to_timestamp(v.finished) END,
    exit_code = CASE WHEN v.outcome IS NULL THEN j.exit_code ELSE v.rc END,
    log_path = CASE WHEN v.outcome IS NULL THEN j.log_path ELSE v.log END,
    error = CASE WHEN v.outcome IS NULL THEN j.error ELSE v.error END,
    gate = CASE WHEN v.outcome IS NULL THEN j.gate ELSE v.gate END,
    progress = CASE WHEN v.outcome IS NULL THEN j.progress ELSE v.progress END,
    run_after = CASE WHEN v.outcome = 'failed' THEN to_timestamp(v.run_after)
                     ELSE j.run_after END,
    ready_at = CASE WHEN v.outcome = 'failed' THEN now() ELSE j.ready_at END,
    updated_at = now()
FROM v WHERE j.id = v.id AND j.state = v.was AND j.attempt = v.attempt
"""


async def queue_ended(conn: Conn, ended: Ended, origin: str | None = None) -> None:
    """The decided row updates, their history rows, and what the ended attempts held given
    back (nothing to read; ``origin``: see ``release_attempt_holds``)."""
    if ended.writes:
        await conn.execute(_WRITE_LIFECYCLE, (json_rows(ended.writes),))
    if ended.history:
        # one JSON document of rows (``json_rows``: four array parameters cost ~10 % of the
        # scheduler's CPU in a flood)
        await conn.execute(
            "INSERT INTO job_history (job_id, attempt, event, detail) "
            "SELECT h->>0, (h->>1)::int, h->>2, h->3 FROM jsonb_array_elements(%s::jsonb) h",
            (json_rows(ended.history),),
        )
    await release_attempt_holds(conn, ended.over, origin)


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
                   j.root_cause, j.tenant,
                   coalesce(array_agg(d.dep_id ORDER BY d.dep_id)
                            FILTER (WHERE d.dep_id IS NOT NULL), '{}') AS deps,
                   coalesce(array_agg(d.needs ORDER BY d.dep_id)
                            FILTER (WHERE d.dep_id IS NOT NULL), '{}') AS needs
            FROM jobs j LEFT JOIN job_deps d ON d.job_id = j.id AND j.state = 'waiting'
            WHERE j.id = ANY(ARRAY(SELECT id FROM down))  -- by primary key, whatever the plan
            GROUP BY j.id
        )
        SELECT id, state, at, root_cause, tenant, deps, needs, false FROM nodes
        UNION ALL
        SELECT l.id, l.state, 0::float8, l.root_cause, l.tenant, '{}', '{}', true
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
    for jid, state, at, root, tenant, deps, needs, leaf in await cur.fetchall():
        edges = () if leaf else tuple(Edge(d, Needs(n)) for d, n in zip(deps, needs, strict=True))
        nodes.append(Node(jid, state, edges, at, root, tenant))
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
