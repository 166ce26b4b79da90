"""PostgreSQL side of admission control: the queue's rows, semaphores, the durable
sliding-window log, controls, gates, and the admission transaction itself.

Invariants:
- The admission transaction is the authority. The admission core decides from a snapshot;
  here every candidate is re-checked under locks (semaphore rows, then rate-limit keys,
  each in name order, then the job rows, so two transactions never wait on each other in a
  cycle): a job is dispatched only if it is still ready (a guarded update), every semaphore
  it needs has room, and every rate-limit key it counts against has fewer than N
  admissions in (now - W, now]. A hot cycle admits in its own transaction
  (``CyclePlanner``: the semaphores it has released into are locked by then).
  So limits and capacities hold exactly even while two processes briefly both think they
  own a tenant (a rebalance, a paused zombie).
- What a job takes is written with it (``job_holds``) and released exactly once
  (``release_holds`` deletes the rows it gives back), on every end of an attempt; holds
  belong to one attempt (``release_attempt_holds``): a cancelled attempt keeps them until
  its end is reported.
- A dispatch is confirmed once the broker has it: its send's row (``dispatch_sends``, one
  per admission transaction) is deleted then; a recorded start confirms it too.
- Values always travel as parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import psycopg

from agents.core.admission import Gate
from agents.core.depth import UNITS, slot_units
from agents.core.ratelimit import Limit
from agents.core.semaphores import GLOBAL, GLOBAL_CAPACITY, SLOTS, Need
from agents.store.ratelog import RateState, rate_state
from agents.store.rows import (
    DISPATCH_COLS,
    QUEUED_COLS,
    DispatchJob,
    QueuedRow,
    ReadyJob,
    json_rows,
    q,
)

Conn = psycopg.AsyncConnection[Any]
Cursor = psycopg.AsyncCursor[Any]
CHANNEL = "jobstream"
# Statements that look jobs up by id test their state as ``(state = '…') IS TRUE``: a filter
# on the rows the primary key finds, never an index condition. A burst of ready (or waiting)
# jobs outgrows the table's statistics until the next ANALYZE, and the planner then scanned
# the whole partial index of ready jobs for every batch (5 ms instead of 0.25 ms at 16,000
# ready jobs, measured).


async def load_ready(conn: Conn, ids: Sequence[str]) -> list[QueuedRow]:
    cur = await conn.execute(
        q(
            "SELECT {cols} FROM jobs WHERE id = ANY(%s) AND (state = 'ready') IS TRUE",
            cols=QUEUED_COLS,
        ),
        (list(ids),),
    )
    return [QueuedRow(*r) for r in await cur.fetchall()]


async def ready_tenants(conn: Conn) -> list[str]:
    cur = await conn.execute("SELECT DISTINCT tenant FROM jobs WHERE state = 'ready'")
    return [r[0] for r in await cur.fetchall()]


async def load_ready_of(conn: Conn, tenants: Sequence[str]) -> list[QueuedRow]:
    if not tenants:
        return []
    cur = await conn.execute(
        q(
            "SELECT {cols} FROM jobs WHERE tenant = ANY(%s) AND state = 'ready'",
            cols=QUEUED_COLS,
        ),
        (list(tenants),),
    )
    return [QueuedRow(*r) for r in await cur.fetchall()]


async def ensure_semaphores(conn: Conn, capacity: Mapping[str, int]) -> None:
    """Create or resize the configured semaphores (named resources, kind maxima, ``*``)."""
    caps = {GLOBAL: GLOBAL_CAPACITY, **capacity}
    names = sorted(caps)
    await conn.execute(
        "INSERT INTO semaphores (name, capacity) SELECT * FROM unnest(%s::text[], %s::int[]) "
        "ON CONFLICT (name) DO UPDATE SET capacity = excluded.capacity",
        (names, [caps[n] for n in names]),
    )


async def semaphore_snapshot(conn: Conn) -> dict[str, tuple[int, int]]:
    cur = await conn.execute("SELECT name, capacity, used FROM semaphores")
    return {name: (cap, used) for name, cap, used in await cur.fetchall()}


async def live_slots(conn: Conn, lost_after_s: float) -> int:
    """The slots of the workers heard from within ``lost_after_s``."""
    cur = await conn.execute(
        "SELECT coalesce(sum(slots_total), 0) FROM workers WHERE state = 'running' "
        "AND last_seen > now() - make_interval(secs => %s)",
        (lost_after_s,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def refresh_capacity(conn: Conn, factor: float, lost_after_s: float) -> tuple[int, int]:
    """Set the ``slots`` semaphore from live workers' heartbeats: ``factor`` × their slots,
    at most the brake's target (both in whole slots) when it holds, in units of expected work
    (``UNITS`` per slot). Returns (old, new); a rise is announced so
    admission wakes."""
    live = await live_slots(conn, lost_after_s)
    new = int(live * factor) * UNITS  # a slot is UNITS units of expected work (``depth``)
    cur = await conn.execute("SELECT target FROM brake WHERE name = 'slots'")
    brake = await cur.fetchone()
    if brake is not None and brake[0] is not None:
        new = min(new, brake[0] * UNITS)  # the host-load brake holds capacity down
    if live:  # never below a whole slot's budget: the longest job always fits
        new = max(new, slot_units(factor))
    cur = await conn.execute("SELECT capacity FROM semaphores WHERE name = %s FOR UPDATE", (SLOTS,))
    old_row = await cur.fetchone()
    old = old_row[0] if old_row else -1
    if old != new:
        await conn.execute(
            "INSERT INTO semaphores (name, capacity) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET capacity = excluded.capacity",
            (SLOTS, new),
        )
        if new > old:
            await notify(conn, "capacity")
    return old, new


async def notify(conn: Conn, payload: str) -> None:
    """Announce to every admission process (delivered when the transaction commits)."""
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


async def release_holds(conn: Conn, job_ids: Sequence[str]) -> None:
    """Give back what these jobs hold (exactly once: the rows are deleted) and announce it
    when anything was given back. Two statements and no result to read, so a pipeline
    carries them with the caller's other statements: the semaphores are locked in name order
    first (as admission locks them: no deadlock), then the holds are deleted, the counts
    lowered and the admission processes notified in one statement."""
    if not job_ids:
        return
    ids = list(job_ids)
    await conn.execute(
        "SELECT name FROM semaphores WHERE name IN "
        "(SELECT name FROM job_holds WHERE job_id = ANY(%s)) ORDER BY name FOR UPDATE",
        (ids,),
    )
    await conn.execute(
        """WITH d AS (DELETE FROM job_holds WHERE job_id = ANY(%s) RETURNING name, amount),
           v AS (SELECT name, sum(amount)::int AS amount FROM d GROUP BY name),
           u AS (UPDATE semaphores s SET used = greatest(0, s.used - v.amount)
                 FROM v WHERE s.name = v.name RETURNING s.name)
           SELECT pg_notify(%s, 'release') FROM (SELECT 1 FROM u LIMIT 1) AS released""",
        (ids, CHANNEL),
    )


async def release_attempt_holds(
    conn: Conn, attempts: Sequence[tuple[str, int]], origin: str | None = None
) -> None:
    """Give back what these attempts hold (``(job id, attempt)``; exactly once), like
    :func:`release_holds` but leaving other attempts' holds alone: a cancelled attempt still
    stopping and its retry each hold their own. ``origin``: the releasing process admits
    into what it released itself (a hot cycle): its own admission ignores the NOTIFY."""
    if not attempts:
        return
    rows = json_rows(attempts)
    await conn.execute(
        """SELECT name FROM semaphores WHERE name IN
           (SELECT h.name FROM job_holds h JOIN (SELECT a->>0 AS id, (a->>1)::int AS attempt
                                                 FROM jsonb_array_elements(%s::jsonb) a) v
            ON h.job_id = v.id AND h.attempt = v.attempt) ORDER BY name FOR UPDATE""",
        (rows,),
    )
    await conn.execute(
        """WITH d AS (DELETE FROM job_holds h
                     USING (SELECT a->>0 AS id, (a->>1)::int AS attempt
                            FROM jsonb_array_elements(%s::jsonb) a) AS v
                     WHERE h.job_id = v.id AND h.attempt = v.attempt
                     RETURNING h.name, h.amount),
           v AS (SELECT name, sum(amount)::int AS amount FROM d GROUP BY name),
           u AS (UPDATE semaphores s SET used = greatest(0, s.used - v.amount)
                 FROM v WHERE s.name = v.name RETURNING s.name)
           SELECT pg_notify(%s, %s) FROM (SELECT 1 FROM u LIMIT 1) AS released""",
        (rows, CHANNEL, release_payload(origin)),
    )


def release_payload(origin: str | None) -> str:
    """The NOTIFY payload of a release (``release`` or ``release:<origin>``)."""
    return "release" if origin is None else f"release:{origin}"


async def controls(conn: Conn) -> tuple[set[str], list[Limit]]:
    """Pauses (as ``scope:name``) and the run-time rate limits."""
    cur = await conn.execute("SELECT scope, name FROM pauses")
    paused = {f"{scope}:{name}" for scope, name in await cur.fetchall()}
    cur = await conn.execute('SELECT scope, match, "limit", window_s FROM rate_limits')
    limits = [
        Limit(scope, limit, window, match) for scope, match, limit, window in await cur.fetchall()
    ]
    return paused, limits


async def write_gates(conn: Conn, gates: Iterable[tuple[str, str, float | None]]) -> set[str]:
    """Store the gates of jobs still ready; the ids whose row took its gate."""
    rows = list(gates)
    if not rows:
        return set()
    cur = await conn.execute(
        """UPDATE jobs j SET gate = v.gate, gate_until = v.until
           FROM unnest(%s::text[], %s::text[], %s::float8[]) AS v(id, gate, until)
           WHERE j.id = v.id AND (j.state = 'ready') IS TRUE
           RETURNING j.id""",
        ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]),
    )
    return {r[0] for r in await cur.fetchall()}


@dataclass(frozen=True, slots=True)
class Candidate:
    id: str
    holds: tuple[Need, ...]
    rate_keys: tuple[tuple[str, int, float], ...]  # (key, limit, window_s)


class Dispatched(NamedTuple):
    job: DispatchJob
    priority: int
    size: int
    ready_at: float


@dataclass(slots=True)
class AdmitResult:
    """Jobs dispatched now, and jobs refused (the core's snapshot was stale) with their gate.
    Candidates in neither are no longer ready (cancelled, or admitted by another process)."""

    dispatched: list[Dispatched]
    refused: dict[str, Gate]
    send: int | None = None  # the dispatches' send, to confirm once the broker has them


@dataclass(slots=True)
class PendingAdmit:
    """The admission transaction's writes, queued: :meth:`result` reads what they returned
    (after COMMIT went out with them: one round trip for the writes and the commit)."""

    cursor: psycopg.AsyncCursor[Any] | None
    refused: dict[str, Gate]

    async def result(self) -> AdmitResult:
        if self.cursor is None:
            return AdmitResult([], self.refused)
        rows = await self.cursor.fetchall()
        return AdmitResult(
            [Dispatched(DispatchJob(*r[:-4]), *r[-4:-1]) for r in rows],
            self.refused,
            rows[0][-1] if rows else None,
        )


@dataclass(slots=True)
class CyclePlan:
    """What an admission owner decided inside a hot cycle's transaction: the candidates to
    dispatch, the ready jobs it did not queue (for their owner: ``jobs.ready``), and its own
    note of the decision (carried to what it does after the commit)."""

    candidates: list[Candidate]
    forward: list[ReadyJob]
    note: Any = None


class CyclePlanner(Protocol):
    """An admission owner deciding inside a hot cycle's transaction (``settle_batch``)."""

    origin: str  # tags the cycle's release NOTIFY, which its own admission ignores

    def plan(
        self, ready: Sequence[ReadyJob], semaphores: Mapping[str, tuple[int, int]], now: float
    ) -> CyclePlan:
        """Queue the ready jobs it owns and decide for the capacity the semaphores show
        (their rows locked by the transaction: ``(capacity, used)`` by name)."""
        ...

    def abandon(self, plan: CyclePlan) -> None:
        """The transaction failed: the candidates go back to the queue."""
        ...


async def lock_semaphores(conn: Conn, names: Sequence[str] | None = None) -> Cursor:
    """Lock semaphore rows (``names``, or all of them) in name order, reading ``(name,
    capacity, used)``. Every transaction that admits or releases locks them first and a
    job's row after, so two never wait on each other in a cycle."""
    if names is None:
        return await conn.execute(
            "SELECT name, capacity, used FROM semaphores ORDER BY name FOR UPDATE"
        )
    return await conn.execute(
        "SELECT name, capacity, used FROM semaphores WHERE name = ANY(%s) ORDER BY name FOR UPDATE",
        (list(names),),
    )


async def read_semaphores(cur: Cursor) -> dict[str, tuple[int, int]]:
    return {name: (cap, used) for name, cap, used in await cur.fetchall()}


def rate_limits_of(candidates: Sequence[Candidate]) -> dict[str, tuple[int, float]]:
    """The window keys the candidates count against, with their limit and window."""
    return {k: (n, w) for c in candidates for k, n, w in c.rate_keys}


def check(
    candidates: Sequence[Candidate],
    semaphores: Mapping[str, tuple[int, int]],
    rates: RateState,
) -> tuple[list[Candidate], dict[str, Gate], dict[str, float]]:
    """The candidates that fit the locked semaphores and window keys, in order, the others
    with their gate, and the not-before of each accepted one a limit holds at its start
    (``agents.core.startlimit``). Every candidate is counted as if still ready
    (conservative: one that is not is simply not dispatched)."""
    free = {name: cap - used for name, (cap, used) in semaphores.items()}
    count = dict(rates.counts)
    taken: dict[str, int] = {}
    accepted: list[Candidate] = []
    refused: dict[str, Gate] = {}
    not_before: dict[str, float] = {}
    for c in candidates:
        short = next((n for n, a in c.holds if free.get(n, -1) < a), None)
        if short is not None:
            refused[c.id] = Gate("semaphore", f"{short} has no room (another process took it)")
            continue
        over = next((k for k, n, _ in c.rate_keys if count.get(k, 0) >= n), None)
        if over is not None:
            refused[c.id] = Gate("rate_limit", f"{over} reached (another process admitted)")
            continue
        nb = -math.inf
        for k, lim, win in c.rate_keys:
            allowed = rates.not_before.get(k, ())
            m = taken.get(k, 0)
            if m >= len(allowed):
                refused[c.id] = Gate("rate_limit", f"{k} {lim}/{win:g}s: waiting for a start")
                break
            nb = max(nb, allowed[m])
        if c.id in refused:
            continue
        for n, a in c.holds:
            free[n] -= a
        for k, _, _ in c.rate_keys:
            count[k] = count.get(k, 0) + 1
            taken[k] = taken.get(k, 0) + 1
        if nb > -math.inf:
            not_before[c.id] = nb
        accepted.append(c)
    return accepted, refused, not_before


async def admit(conn: Conn, candidates: Sequence[Candidate], now: float) -> PendingAdmit:
    """The admission transaction of a round (see the module's invariants), on a connection
    in pipeline mode inside the caller's transaction: the locks and reads take one round
    trip, the writes are queued for the caller's COMMIT. ``now`` is the admission time
    recorded in the window log, the same value the core decided with."""
    names = sorted({n for c in candidates for n, _ in c.holds})
    sem_cur = await lock_semaphores(conn, names)
    rates = await rate_state(conn, rate_limits_of(candidates), now)
    return await admit_locked(conn, candidates, await read_semaphores(sem_cur), rates, now)


async def admit_locked(
    conn: Conn,
    candidates: Sequence[Candidate],
    semaphores: Mapping[str, tuple[int, int]],
    rates: RateState,
    now: float,
) -> PendingAdmit:
    """Check the candidates against what this transaction has locked and queue the writes
    of those that fit (their rows guarded by ``state = 'ready'``)."""
    accepted, refused, not_before = check(candidates, semaphores, rates)
    if not accepted:
        return PendingAdmit(None, refused)
    holds = [(c.id, n, a) for c in accepted for n, a in c.holds]
    log = [(c.id, k) for c in accepted for k, _, _ in c.rate_keys]
    # one statement: the jobs still ready are dispatched, and only theirs are the holds,
    # the semaphore counts and the window log entries (queued: they go with the COMMIT)
    cur = await conn.execute(
        q(
            """
        WITH d AS (
            UPDATE jobs SET state = 'dispatched', attempt = attempt + 1, gate = NULL,
                gate_until = NULL, dispatched_at = now(), dispatch_confirmed = false,
                dispatch_send = (SELECT nextval('dispatch_send_seq')), updated_at = now(),
                not_before = (%s::jsonb ->> id)::float8
            WHERE id = ANY(%s) AND (state = 'ready') IS TRUE
            RETURNING *),
        -- the send, unconfirmed until the broker has all of it (``confirm_send``)
        send AS (INSERT INTO dispatch_sends (id) SELECT DISTINCT dispatch_send FROM d),
        -- the history row goes with the state change: a worker's start, applied before
        -- the dispatch's confirmation is recorded, still comes after it
        h AS (INSERT INTO job_history (job_id, attempt, event)
              SELECT id, attempt, 'dispatched' FROM d),
        v AS (SELECT v.id, d.attempt, v.name, v.amount
              FROM (SELECT h->>0 AS id, h->>1 AS name, (h->>2)::int AS amount
                    FROM jsonb_array_elements(%s::jsonb) h) AS v
              JOIN d ON d.id = v.id),
        held AS (INSERT INTO job_holds (job_id, attempt, name, amount) SELECT * FROM v),
        used AS (UPDATE semaphores s SET used = s.used + t.amount
                 FROM (SELECT name, sum(amount)::int AS amount FROM v GROUP BY name) AS t
                 WHERE s.name = t.name),
        logged AS (INSERT INTO rate_log (key, at, job_id, attempt)
                   SELECT r.key, %s, d.id, d.attempt
                   FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS r(id, key, i)
                   JOIN d ON d.id = r.id ORDER BY r.i)
        SELECT {cols}, priority, size, extract(epoch from ready_at)::float8, dispatch_send
        FROM d
        """,
            cols=DISPATCH_COLS,
        ),
        (
            json_rows(not_before),
            [c.id for c in accepted],
            json_rows(holds),
            now,
            [x[0] for x in log],
            [x[1] for x in log],
        ),
    )
    return PendingAdmit(cur, refused)
