"""PostgreSQL, the source of truth for job state: the only module that talks to the database.

Invariants:
- Every state change is a guarded ``UPDATE … WHERE state = ANY(allowed) [AND attempt = n]``
  mirroring ``agents.core.lifecycle``; replaying an event changes nothing.
- One transaction per batch of events, never one per event; many rows per statement.
- Parameterized SQL only; identifiers never come from input.
- psycopg errors are translated to :class:`StoreUnavailable` at this boundary for connection
  failures; constraint violations are bugs and propagate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from agents.core import brake as brake_core
from agents.core.admission import GLOBAL, SLOTS
from agents.core.brake import HostSample, Thresholds
from agents.core.deps import DependencyIndex, Fail, Release
from agents.core.lifecycle import Backoff
from agents.errors import StoreUnavailable
from agents.store.admission import (
    CyclePlan,
    CyclePlanner,
    PendingAdmit,
    admit_locked,
    lock_semaphores,
    rate_counts,
    read_semaphores,
    refresh_capacity,
    release_attempt_holds,
)
from agents.store.commands import Applied, JobCommand, apply_commands
from agents.store.dependencies import (
    Settled,
    apply_decisions,
    decide_lifecycle,
    load_working_set,
    queue_decisions,
    queue_ended,
    queue_inserts,
    queue_lifecycle,
    queue_working_set,
    read_inserted,
    read_ready,
    read_working_set,
)
from agents.store.rows import (
    CONFIRMED,
    DISPATCH_COLS,
    Accepted,
    DeadLetterRow,
    DispatchJob,
    ReadyJob,
    q,
)
from streams.events import JobEvent, JobStarted

MIGRATION_LOCK = 7_301_947_113
MONITOR_LOCK = 7_301_947_114
# how long an attempt cancelled before it started keeps its holds without a report: the
# workers' control look-back (agents.worker.control.CONTROL_LOOKBACK_S)
UNSTARTED_HOLD_S = 60.0


@dataclass(frozen=True, slots=True)
class Orphan:
    """A running job whose worker is lost, or restarted since the job started."""

    id: str
    attempt: int
    group: str | None
    worker: str
    why: str  # lost | restarted | unowned (no live worker runs or holds it)
    silent_s: float


@dataclass(frozen=True, slots=True)
class Undelivered:
    """A dispatched job (its dispatch confirmed by the broker a bound ago) that no live
    worker runs or holds buffered: it is still in Kafka, owned by whichever live worker is
    assigned its partition, if any."""

    id: str
    attempt: int
    kind: str
    group: str | None
    waited_s: float
    shared: bool  # it holds more than a slot and its global share: see ``holds_shared``


@dataclass(frozen=True, slots=True)
class LostWork:
    newly_lost: list[str]
    orphans: list[Orphan]
    released: int = 0  # holds of attempts that ended unreported, given back
    undelivered: list[Undelivered] = field(default_factory=list)
    assigned: frozenset[str] = frozenset()  # live workers' dispatch partitions, topic[p]


def _merge_ready(retries: Sequence[ReadyJob], read: Sequence[ReadyJob]) -> list[ReadyJob]:
    """Ready jobs once each, a row read from PostgreSQL over a retry's bare record."""
    return list({r.id: r for r in (*retries, *read)}.values())


def migrations() -> list[tuple[int, str, str]]:
    files = sorted((Path(__file__).resolve().parent / "migrations").glob("*.sql"))
    return [(int(p.name.split("_", 1)[0]), p.name, p.read_text()) for p in files]


# the tables the agents' transactions touch
HOT_TABLES = (
    "jobs",
    "job_deps",
    "job_history",
    "job_holds",
    "semaphores",
    "rate_log",
    "workers",
    "pauses",
    "rate_limits",
    "dead_letters",
)


async def warm_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """Ready a long-running agent's connection for its hot statements.

    - Every statement is prepared on first use and planned once per connection
      (``prepare_threshold`` 0, ``plan_cache_mode = force_generic_plan``): by default psycopg
      prepares a statement on its sixth run and the server re-plans a prepared one for its
      first five runs, so each statement cost a planning per run at first, 0.45–1.9 ms for the
      working-set query (measured), on every connection.
    - A statement is planned against every hot table: a server process loads a table's and its
      indexes' catalog entries the first time one plans against them. Measured: a
      lifecycle-shaped transaction took 4–6 ms as a cold connection's first (27 ms as the
      first in its database), 3–4 ms after this, 2–2.5 ms from the second on.
    Best effort for the tables: before the migrations ran, there is nothing to warm."""
    conn.prepare_threshold = 0
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.commit()
    try:
        for table in HOT_TABLES:
            await conn.execute(sql.SQL("SELECT 1 FROM {} LIMIT 0").format(sql.Identifier(table)))
    except psycopg.errors.UndefinedTable:
        pass
    finally:
        await conn.rollback()


class PostgresJobStore:
    def __init__(
        self, dsn: str, *, min_size: int = 1, max_size: int = 4, warm: bool = False
    ) -> None:
        """``warm``: connections are readied for the hot statements when they open
        (:func:`warm_connection`; long-running agents, so their first batches do not pay)."""
        self.dsn = dsn
        self._pool = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={"autocommit": False},
            configure=warm_connection if warm else None,
        )

    async def open(self, timeout_s: float = 30.0) -> None:
        try:
            await self._pool.open(wait=True, timeout=timeout_s)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from None
        except Exception as exc:  # psycopg_pool.PoolTimeout
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL within {timeout_s:.0f} s: {exc}"
            ) from None

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> PostgresJobStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def pipelined(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection in pipeline mode, for a caller that opens its transaction
        itself and reads results after COMMIT went out with its last statements (one round
        trip fewer than reading first)."""
        try:
            async with self._pool.connection() as conn, conn.pipeline():
                yield conn
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL: {exc}") from None

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection whose statements commit each on its own: a lone statement goes
        without BEGIN and COMMIT (one command for the server, not three)."""
        try:
            async with self._pool.connection() as conn:
                await conn.set_autocommit(True)
                try:
                    yield conn
                finally:
                    await conn.set_autocommit(False)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL: {exc}") from None

    @asynccontextmanager
    async def tx(self, *, pipeline: bool = False) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """One transaction on a pooled connection. ``pipeline``: in pipeline mode, so BEGIN
        travels with the first statement and COMMIT with the last writes (a transaction of
        one query is one round trip, not three); for the hot paths, whose statements are
        single queries (no COPY, no multi-statement scripts)."""
        try:
            async with self._pool.connection() as conn:
                if pipeline:
                    async with conn.pipeline(), conn.transaction():
                        yield conn
                else:
                    async with conn.transaction():
                        yield conn
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL: {exc}") from None

    # -- schema -------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        """Apply pending migrations under an advisory lock; return the names applied."""
        applied: list[str] = []
        async with self.tx() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT version FROM schema_migrations")
            done = {r[0] for r in await cur.fetchall()}
            for version, name, sql in migrations():
                if version in done:
                    continue
                await conn.execute(sql.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
                )
                applied.append(name)
        return applied

    # -- intake -------------------------------------------------------------------------

    async def settle_batch(
        self,
        accepted: Sequence[Accepted],
        events: Sequence[JobEvent],
        *,
        now: float,
        grace_s: float,
        allow_cross_tenant: bool,
        backoff: Mapping[str, Backoff] | None = None,
        planner: CyclePlanner | None = None,
    ) -> Settled:
        """The hot cycle's transaction: persist submissions and lifecycle events, settle
        the affected part of the graph, admit into the capacity it freed, and return what
        follows (``Settled``: jobs to forward as ready, submissions of this batch rejected as
        impossible, reported starts of attempts already over whose process may run
        (``agents.core.lifecycle.start_is_stale``), the durations of the successes, and what
        ``planner``, the admission owner of this process, decided and dispatched).

        Round trips, whatever the batch: (1) the inserts, the rows the events touch (locked)
        and the working set around every job they may change; the core decides the
        transitions, then the dependencies; (2) the row updates, history, released holds,
        the decisions, the replay check, and with a planner that has something to decide
        the semaphores (locked); the planner decides; ((3) the window counts, when a
        candidate counts against a rate limit); the dispatches and COMMIT, read after the
        commit. Without a planner, or nothing to admit, COMMIT goes with (2)."""
        finished = [e.job_id for e in events if not isinstance(e, JobStarted)]
        plan: CyclePlan | None = None
        pending: PendingAdmit | None = None
        deciding: CyclePlanner | None = None
        try:
            async with self.pipelined() as conn:
                async with conn.transaction():
                    inserts = await queue_inserts(conn, accepted)
                    touched = await queue_lifecycle(conn, events)
                    # a superset of what changes (a duplicate changes nothing), read before
                    # the transitions: the core's new states replace the ones read
                    # (a new job that waits for nothing changes nobody: it is ready, and its
                    # dependents wait for its end)
                    waits = [a.job.id for a in accepted if a.job.depends_on or a.job.order_key]
                    around = await queue_working_set(conn, list(dict.fromkeys([*waits, *finished])))
                    inserted = await read_inserted(inserts)
                    ended = await decide_lifecycle(events, touched, backoff or {}, now)
                    nodes = [
                        replace(n, state=ended.states[n.id]) if n.id in ended.states else n
                        for n in await read_working_set(around)
                    ]
                    waiting = set(waits)
                    changed = [*(j for j in inserted if j in waiting), *ended.terminal]
                    decisions = DependencyIndex.of(nodes, allow_cross_tenant).settle(
                        changed, now, grace_s
                    )
                    # the planner decides when capacity was freed or jobs became ready
                    deciding = (
                        planner
                        if ended.over
                        or ended.retry
                        or len(waiting) < len(accepted)
                        or any(isinstance(d, Release) for d in decisions)
                        else None
                    )
                    await queue_ended(conn, ended, deciding.origin if deciding else None)
                    # released now, and (after a replay) released before but maybe never
                    # forwarded; retries with the columns admission queues them by
                    ids = [*(a.job.id for a in accepted), *(r.id for r in ended.retry)]
                    reads = await queue_decisions(conn, decisions, ready_of=(ids, finished))
                    if deciding is not None:
                        locked = await lock_semaphores(conn)
                        found = await read_ready(reads)
                        semaphores = await read_semaphores(locked)
                        ready = _merge_ready(ended.retry, found)
                        plan = deciding.plan(ready, semaphores, now)
                        if plan.candidates:
                            counts = await rate_counts(conn, plan.candidates, now)
                            pending = await admit_locked(
                                conn, plan.candidates, semaphores, counts, now
                            )
                # COMMIT went out with the statements above: their results come in one trip
                if plan is None:
                    ready = _merge_ready(ended.retry, await read_ready(reads))
                admitted = await pending.result() if pending is not None else None
        except BaseException:
            if plan is not None and deciding is not None:
                deciding.abandon(plan)
            raise
        new = set(inserted)
        rejected = [d for d in decisions if isinstance(d, Fail) and d.rejected and d.job in new]
        return Settled(
            ready,
            rejected,
            ended.stale_starts,
            ended.durations,
            released=bool(ended.over),
            plan=plan,
            admitted=admitted,
        )

    async def settle_waiting(
        self,
        older_than_s: float,
        *,
        now: float,
        grace_s: float,
        allow_cross_tenant: bool,
        limit: int = 5_000,
    ) -> list[ReadyJob]:
        """Re-settle waiting jobs older than ``older_than_s``: expire dependencies that never
        arrived and release jobs a race left waiting (the safety net)."""
        async with self.tx() as conn:
            cur = await conn.execute(
                "SELECT id FROM jobs WHERE state = 'waiting' AND accepted_at < "
                "now() - make_interval(secs => %s) ORDER BY accepted_at LIMIT %s",
                (older_than_s, limit),
            )
            ids = [r[0] for r in await cur.fetchall()]
            nodes = await load_working_set(conn, ids)
            decisions = DependencyIndex.of(nodes, allow_cross_tenant).settle(ids, now, grace_s)
            return await apply_decisions(conn, decisions)

    async def apply_job_commands(
        self, cmds: Sequence[JobCommand], *, now: float, grace_s: float, allow_cross_tenant: bool
    ) -> Applied:
        """Cancels and retries from ``jobs.control``, in order and exactly once, with their
        dependents settled (``agents.store.commands``): what was cancelled (and which attempt was
        in flight), what was retried, and the jobs now ready."""
        async with self.tx() as conn:
            return await apply_commands(
                conn, cmds, now=now, grace_s=grace_s, allow_cross_tenant=allow_cross_tenant
            )

    async def job_route(self, ids: Sequence[str]) -> dict[str, tuple[str | None, str]]:
        """job id → (group key, state) for the jobs that exist among ``ids``."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, group_key, state FROM jobs WHERE id = ANY(%s)", (list(ids),)
            )
            rows = {r[0]: (r[1], r[2]) for r in await cur.fetchall()}
            await conn.rollback()
            return rows

    async def record_dead_letters(self, rows: Sequence[DeadLetterRow]) -> None:
        if not rows:
            return
        async with self.tx() as conn, conn.cursor() as cur:
            await cur.executemany(
                'INSERT INTO dead_letters (topic, partition, "offset", key, value, reason) '
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [(r.topic, r.partition, r.offset, r.key, r.value, r.reason) for r in rows],
            )

    # -- admission ----------------------------------------------------------------------

    async def unconfirmed_rows(self, ids: Sequence[str]) -> list[DispatchJob]:
        """Jobs of ``ids`` still dispatched whose dispatch was never confirmed (a crash between
        the admission transaction and the broker's acknowledgement)."""
        if not ids:
            return []
        async with self.tx() as conn:
            cur = await conn.execute(
                q(
                    "SELECT {cols} FROM jobs j WHERE id = ANY(%s) AND state = 'dispatched' "
                    "AND NOT {confirmed}",
                    cols=DISPATCH_COLS,
                    confirmed=CONFIRMED,
                ),
                (list(ids),),
            )
            return [DispatchJob(*r) for r in await cur.fetchall()]

    async def confirm_dispatch(self, jobs: Sequence[DispatchJob]) -> None:
        """Record that the broker has these re-sent dispatches (row by row: the reconciler's
        path; an admission's send is confirmed whole by :meth:`confirm_send`), and forget the
        sends they belonged to that have no other dispatch left unconfirmed."""
        if not jobs:
            return
        ids = [j.id for j in jobs]
        async with self.autocommit() as conn:  # one statement
            await conn.execute(
                """WITH u AS (
                       UPDATE jobs j SET dispatch_confirmed = true
                       FROM unnest(%s::text[], %s::int[]) AS v(id, attempt)
                       WHERE j.id = v.id AND j.attempt = v.attempt AND NOT j.dispatch_confirmed
                       RETURNING j.dispatch_send)
                   DELETE FROM dispatch_sends s WHERE s.id IN (SELECT dispatch_send FROM u)
                     AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.state = 'dispatched'
                                     AND o.dispatch_send = s.id AND NOT o.dispatch_confirmed
                                     AND o.id <> ALL(%s))""",
                (ids, [j.attempt for j in jobs], ids),
            )

    async def confirm_send(self, send: int) -> None:
        """Record that the broker has every dispatch of an admission's send: one row, never
        held by a transaction that records starts."""
        async with self.autocommit() as conn:
            await conn.execute("DELETE FROM dispatch_sends WHERE id = %s", (send,))

    async def prune_sends(self, older_than_s: float) -> int:
        """Forget sends a crash left unconfirmed (their jobs started since, or were re-sent)
        once the reconciler has had several chances to re-send their dispatches (one it
        missed counts as confirmed then: the liveness monitor's undelivered-work net hands
        it back if no live worker has it)."""
        async with self.autocommit() as conn:
            cur = await conn.execute(
                "DELETE FROM dispatch_sends WHERE at < now() - make_interval(secs => %s)",
                (older_than_s,),
            )
            return cur.rowcount

    async def record_heartbeats(
        self,
        beats: Sequence[Any],
        *,
        capacity_factor: float = 1.0,
        lost_after_s: float = 15.0,
        progress: Mapping[int, int] | None = None,
    ) -> None:
        """Record heartbeats (a lost worker that speaks again is live again) and running jobs'
        progress and, in the same transaction, the live capacity they add up to.

        ``last_seen`` is this database's clock at receipt, never the worker's own ``at``:
        liveness is judged against ``now()``, and a worker's clock may be off by any amount
        (30 s behind, it was declared lost on every tick). A worker's beats share one
        partition, so the last of a batch is its latest. ``progress``: partition → the next
        offset to record, once these are (see :meth:`silent_workers`)."""
        if not beats and not progress:
            return
        latest = {b.worker: b for b in beats}
        job_progress = {j: v for b in latest.values() for j, v in b.progress.items()}
        async with self.tx() as conn, conn.cursor() as cur:
            if progress:  # in the same transaction as the beats it covers
                await conn.execute(
                    "INSERT INTO heartbeat_progress (partition, next_offset) "
                    "SELECT * FROM unnest(%s::int[], %s::bigint[]) "
                    "ON CONFLICT (partition) DO UPDATE SET at = now(), next_offset = "
                    "greatest(heartbeat_progress.next_offset, excluded.next_offset)",
                    (list(progress), list(progress.values())),
                )
            if not beats:
                return
            await cur.executemany(
                """
                INSERT INTO workers (id, host, slots_total, slots_free, running, state, last_seen,
                                     labels, load, pid, since, buffered, assigned)
                VALUES (%s, %s, %s, %s, %s, %s, now(), %s, %s, %s, to_timestamp(%s), %s, %s)
                ON CONFLICT (id) DO UPDATE SET host = excluded.host,
                    slots_total = excluded.slots_total, slots_free = excluded.slots_free,
                    running = excluded.running, buffered = excluded.buffered,
                    assigned = excluded.assigned, state = excluded.state,
                    last_seen = excluded.last_seen,
                    labels = excluded.labels, load = excluded.load, pid = excluded.pid,
                    since = excluded.since,
                    lost_at = CASE WHEN excluded.state = 'running' THEN NULL
                                   ELSE workers.lost_at END
                """,
                [
                    (
                        b.worker,
                        b.host,
                        b.slots_total,
                        b.slots_free,
                        b.running,
                        b.state,
                        b.labels,
                        b.load,
                        b.pid,
                        b.since,
                        b.buffered,
                        b.assigned,
                    )
                    for b in latest.values()
                ],
            )
            if job_progress:
                await conn.execute(
                    "UPDATE jobs j SET progress = p.v FROM unnest(%s::text[], %s::real[]) "
                    "AS p(id, v) WHERE j.id = p.id AND j.state = 'running'",
                    (list(job_progress), list(job_progress.values())),
                )
            await refresh_capacity(conn, capacity_factor, lost_after_s)

    async def silent_workers(self, lost_after_s: float) -> tuple[list[str], dict[int, int]]:
        """Workers not heard from for ``lost_after_s``, and how far each heartbeat partition
        is recorded (the next offset): the monitor declares a silent worker lost only when
        its partition is recorded to the broker's end."""
        async with self.tx() as conn:
            cur = await conn.execute(
                "SELECT id FROM workers WHERE state IN ('running', 'draining') "
                "AND last_seen < now() - make_interval(secs => %s)",
                (lost_after_s,),
            )
            silent = [r[0] for r in await cur.fetchall()]
            if not silent:
                return [], {}
            cur = await conn.execute("SELECT partition, next_offset FROM heartbeat_progress")
            return silent, {r[0]: r[1] for r in await cur.fetchall()}

    async def lost_work(
        self,
        lost_after_s: float,
        capacity_factor: float,
        judged: Sequence[str] | None = None,
    ) -> LostWork:
        """The monitor's step (one process at a time, under an advisory lock): declare silent
        workers lost (of ``judged`` only, when given: those whose silence is certain), and
        list running jobs whose worker is lost or restarted since their start. Those are
        retried by publishing a failure of their attempt (fenced)."""
        async with self.tx() as conn:
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (MONITOR_LOCK,))
            row = await cur.fetchone()
            if not row or not row[0]:
                return LostWork([], [])
            cur = await conn.execute(
                "UPDATE workers SET state = 'lost', lost_at = now() "
                "WHERE state IN ('running', 'draining') "
                "AND last_seen < now() - make_interval(secs => %s) "
                "AND (%s::text[] IS NULL OR id = ANY(%s::text[])) RETURNING id",
                (lost_after_s, judged, judged),
            )
            newly = [r[0] for r in await cur.fetchall()]
            if newly:
                await refresh_capacity(conn, capacity_factor, lost_after_s)
            cur = await conn.execute(
                """SELECT j.id, j.attempt, j.group_key, w.id,
                          CASE WHEN w.state = 'lost' THEN 'lost'
                               WHEN j.started_at < w.since THEN 'restarted'
                               ELSE 'unowned' END,
                          extract(epoch from now() - w.last_seen)::float8
                   FROM jobs j JOIN workers w ON w.id = j.worker
                   WHERE j.state = 'running'
                     AND (w.state = 'lost' OR j.started_at < w.since
                          -- started a bound ago, and no live worker runs or holds it: its
                          -- worker stopped without reporting it, or left it to a
                          -- partition's next owner that never took it
                          OR (j.updated_at < now() - make_interval(secs => %s)
                              AND NOT EXISTS (
                                  SELECT 1 FROM workers x
                                  WHERE x.state IN ('running', 'draining')
                                    AND (j.id = ANY(x.running) OR j.id = ANY(x.buffered)))))
                   ORDER BY j.started_at LIMIT 10000""",
                (lost_after_s,),
            )
            orphans = [Orphan(*r) for r in await cur.fetchall()]
            # holds of attempts no longer in flight whose end was never reported (a cancelled
            # attempt whose worker died): given back once no live worker runs the job. An
            # attempt that never started keeps them longer: its dispatch may still reach a
            # worker, which reports its end (run, or dropped as cancelled); past the workers'
            # control look-back a worker would not know the cancel anyway
            cur = await conn.execute(
                """SELECT h.job_id, h.attempt FROM job_holds h JOIN jobs j ON j.id = h.job_id
                   CROSS JOIN LATERAL (SELECT EXISTS (
                       SELECT 1 FROM job_history s WHERE s.job_id = h.job_id
                       AND s.attempt = h.attempt AND s.event = 'started') AS started) st
                   WHERE NOT (j.state IN ('dispatched', 'running') AND j.attempt = h.attempt)
                     -- an unstarted attempt a later one followed: by the age of its holds
                     AND CASE WHEN NOT st.started AND j.attempt > h.attempt THEN h.since
                              ELSE j.updated_at END
                         < now() - make_interval(secs => %s + CASE
                             WHEN st.started THEN 0 ELSE %s END)
                     AND NOT EXISTS (SELECT 1 FROM workers w
                                     WHERE w.state IN ('running', 'draining')
                                       AND (j.id = ANY(w.running) OR j.id = ANY(w.buffered)))
                   LIMIT 10000""",
                (lost_after_s, UNSTARTED_HOLD_S),
            )
            stale = [(r[0], r[1]) for r in await cur.fetchall()]
            await release_attempt_holds(conn, stale)
            cur = await conn.execute(
                q(
                    """SELECT j.id, j.attempt, j.kind, j.group_key,
                          extract(epoch from now() - j.dispatched_at)::float8,
                          EXISTS (SELECT 1 FROM job_holds h
                                  LEFT JOIN semaphores s ON s.name = h.name
                                  WHERE h.job_id = j.id AND h.attempt = j.attempt
                                    AND (h.name NOT IN (%s, %s) OR h.amount >= s.capacity))
                   FROM jobs j
                   WHERE j.state = 'dispatched' AND {confirmed}
                     AND j.dispatched_at < now() - make_interval(secs => %s)
                     AND NOT EXISTS (SELECT 1 FROM workers w
                                     WHERE w.state IN ('running', 'draining')
                                       AND (j.id = ANY(w.running) OR j.id = ANY(w.buffered)))
                   ORDER BY j.dispatched_at LIMIT 10000""",
                    confirmed=CONFIRMED,
                ),
                (SLOTS, GLOBAL, lost_after_s),
            )
            undelivered = [Undelivered(*r) for r in await cur.fetchall()]
            assigned: frozenset[str] = frozenset()
            if undelivered:
                cur = await conn.execute(
                    "SELECT DISTINCT a FROM workers, unnest(assigned) AS a "
                    "WHERE state IN ('running', 'draining')"
                )
                assigned = frozenset(r[0] for r in await cur.fetchall())
            return LostWork(newly, orphans, len(stale), undelivered, assigned)

    async def record_host_load(self, samples: Sequence[HostSample]) -> None:
        """Upsert each host's latest telemetry (a sample updates only the fields it has)."""
        rows = sorted(samples, key=lambda x: (x.host, x.at))
        async with self.tx() as conn, conn.cursor() as cur:
            await cur.executemany(
                """INSERT INTO host_load (host, cpu_busy_pct, load_per_cpu, mem_used_pct, at)
                   VALUES (%s, %s, %s, %s, to_timestamp(%s))
                   ON CONFLICT (host) DO UPDATE SET
                     cpu_busy_pct = coalesce(excluded.cpu_busy_pct, host_load.cpu_busy_pct),
                     load_per_cpu = coalesce(excluded.load_per_cpu, host_load.load_per_cpu),
                     mem_used_pct = coalesce(excluded.mem_used_pct, host_load.mem_used_pct),
                     at = greatest(host_load.at, excluded.at)""",
                [(x.host, x.cpu_busy_pct, x.load_per_cpu, x.mem_used_pct, x.at) for x in rows],
            )

    async def brake_step(
        self,
        thresholds: Thresholds,
        interval_s: float,
        capacity_factor: float,
        lost_after_s: float,
    ) -> dict[str, Any] | None:
        """One AIMD step of the brake, at most every ``interval_s`` across all processes
        (serialised by the brake row's lock); the new capacity applied at once. Returns the
        brake (target, static, reason) when a step was taken."""
        async with self.tx() as conn:
            cur = await conn.execute(
                "SELECT target, extract(epoch from now() - at)::float8, "
                "extract(epoch from now())::float8 FROM brake WHERE name = 'slots' "
                "FOR UPDATE SKIP LOCKED"
            )
            row = await cur.fetchone()
            if row is None or row[1] < interval_s:
                return None
            target, _, now = row
            cur = await conn.execute(
                "SELECT coalesce(sum(slots_total), 0) FROM workers WHERE state = 'running' "
                "AND last_seen > now() - make_interval(secs => %s)",
                (lost_after_s,),
            )
            live = await cur.fetchone()
            static = int((live[0] if live else 0) * capacity_factor)
            cur = await conn.execute(
                "SELECT host, extract(epoch from at)::float8, cpu_busy_pct, load_per_cpu, "
                "mem_used_pct FROM host_load"
            )
            samples = [HostSample(*r) for r in await cur.fetchall()]
            state = brake_core.step(brake_core.BrakeState(target), static, samples, now, thresholds)
            await conn.execute(
                "UPDATE brake SET target = %s, static = %s, reason = %s, at = now() "
                "WHERE name = 'slots'",
                (state.target, static, state.reason),
            )
            await refresh_capacity(conn, capacity_factor, lost_after_s)
            return {"target": state.target, "static": static, "reason": state.reason}

    async def brake(self) -> dict[str, Any] | None:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute("SELECT target, static, reason, at FROM brake WHERE name = 'slots'")
            row = await cur.fetchone()
            await conn.rollback()
            return row

    async def workers(self) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                """SELECT id, host, state, slots_total, slots_free, running, labels, load, pid,
                          first_seen, last_seen, lost_at,
                          extract(epoch from now() - last_seen)::float8 AS silent_s
                   FROM workers ORDER BY state = 'running' DESC, last_seen DESC"""
            )
            rows = await cur.fetchall()
            await conn.rollback()
            return rows

    async def recent_durations(self, window_s: float = 3600.0) -> dict[str, float]:
        """Each kind's median run time over its successes of the last ``window_s`` (what
        admission expects of a kind before this process sees it finish)."""
        async with self.tx() as conn:
            cur = await conn.execute(
                """SELECT kind, percentile_cont(0.5) WITHIN GROUP
                       (ORDER BY extract(epoch from finished_at - started_at))
                   FROM jobs WHERE finished_at > now() - make_interval(secs => %s)
                   AND state = 'succeeded' AND started_at IS NOT NULL GROUP BY kind""",
                (window_s,),
            )
            return {kind: float(x) for kind, x in await cur.fetchall() if x is not None}

    async def refresh_capacity(self, capacity_factor: float, lost_after_s: float) -> int:
        """Recompute live worker capacity (workers fall silent without a last heartbeat)."""
        async with self.tx() as conn:
            return (await refresh_capacity(conn, capacity_factor, lost_after_s))[1]

    # -- reconciliation (the safety net) ----------------------------------------------

    async def prune_rate_log(self, now: float, config_horizon_s: float) -> int:
        """Delete window-log entries older than the longest window of any limit."""
        async with self.tx() as conn:
            cur = await conn.execute(
                "DELETE FROM rate_log WHERE at <= %s - greatest(%s, "
                "coalesce((SELECT max(window_s) FROM rate_limits), 0))",
                (now, config_horizon_s),
            )
            return cur.rowcount

    async def unconfirmed_dispatches(self, older_than_s: float, limit: int = 10_000) -> list[str]:
        async with self.tx() as conn:
            cur = await conn.execute(
                q(
                    "SELECT id FROM jobs j WHERE state = 'dispatched' AND NOT {confirmed} AND "
                    "dispatched_at < now() - make_interval(secs => %s) LIMIT %s",
                    confirmed=CONFIRMED,
                ),
                (older_than_s, limit),
            )
            return [r[0] for r in await cur.fetchall()]

    # -- queries ------------------------------------------------------------------------

    async def job(self, job_id: str) -> dict[str, Any] | None:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute("SELECT * FROM jobs WHERE id = %s", (job_id,))
            row = await cur.fetchone()
            if row is None:
                return None
            await cur.execute(
                "SELECT attempt, event, at, detail FROM job_history WHERE job_id = %s ORDER BY id",
                (job_id,),
            )
            row["history"] = await cur.fetchall()
            await conn.rollback()
            return row

    async def workflow(self, workflow_id: str) -> list[dict[str, Any]]:
        """Jobs of a workflow (or dependency group) with their dependencies, in submission
        order."""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                """SELECT j.id, j.kind, j.state, j.gate, j.error, j.attempt, j.trigger,
                          coalesce(array_agg(d.dep_id ORDER BY d.dep_id)
                                   FILTER (WHERE d.dep_id IS NOT NULL), '{}') AS deps
                   FROM jobs j LEFT JOIN job_deps d ON d.job_id = j.id
                   WHERE j.workflow_id = %s OR j.group_key = %s
                   GROUP BY j.id ORDER BY min(j.seq)""",
                (workflow_id, workflow_id),
            )
            rows = await cur.fetchall()
            await conn.rollback()
            return rows

    async def why(
        self, job_id: str, labels: Sequence[str] = (), lost_after_s: float = 15.0
    ) -> dict[str, Any] | None:
        """A job's state and gate, its worker, and the state of each job it waits on;
        ``labels``: its kind's pool, to count the live workers that carry them."""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                "SELECT j.id, j.tenant, j.kind, j.state, j.gate, j.gate_until, j.priority, j.size, "
                "j.error, j.root_cause, j.attempt, j.max_attempts, j.trigger, j.accepted_at, "
                "j.ready_at, extract(epoch from j.run_after)::float8 AS run_after, j.worker, "
                "j.progress, w.state AS worker_state, "
                "extract(epoch from now() - w.last_seen)::float8 AS worker_silent_s "
                "FROM jobs j LEFT JOIN workers w ON w.id = j.worker WHERE j.id = %s",
                (job_id,),
            )
            row = await cur.fetchone()
            if row is not None and labels:
                await cur.execute(
                    "SELECT count(*) AS n FROM workers WHERE state = 'running' AND labels @> %s "
                    "AND last_seen > now() - make_interval(secs => %s)",
                    (sorted(labels), lost_after_s),
                )
                live = await cur.fetchone()
                row["pool_workers"] = live["n"] if live else 0
            if row is not None:
                await cur.execute(
                    """SELECT d.dep_id AS id, d.needs, d.kind AS edge,
                              coalesce(j.state, 'not submitted') AS state
                       FROM job_deps d LEFT JOIN jobs j ON j.id = d.dep_id
                       WHERE d.job_id = %s ORDER BY d.dep_id""",
                    (job_id,),
                )
                row["dependencies"] = await cur.fetchall()
                await cur.execute(
                    "SELECT name, amount FROM job_holds WHERE job_id = %s ORDER BY name", (job_id,)
                )
                row["holds"] = {r["name"]: r["amount"] for r in await cur.fetchall()}
                await cur.execute(
                    "SELECT scope, name, reason FROM pauses WHERE (scope, name) IN "
                    "(('tenant', %s), ('kind', %s), ('job', %s))",
                    (row["tenant"], row["kind"], job_id),
                )
                row["paused_by"] = await cur.fetchall()
                row["ready_ahead"] = None
                if row["state"] == "ready":
                    await cur.execute(
                        "SELECT count(*) AS n FROM jobs WHERE tenant = %s AND state = 'ready' "
                        "AND ready_at < %s",
                        (row["tenant"], row["ready_at"]),
                    )
                    ahead = await cur.fetchone()
                    row["ready_ahead"] = ahead["n"] if ahead else 0
            await conn.rollback()
            return row

    async def job_states(self, ids: Sequence[str]) -> dict[str, str]:
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT id, state FROM jobs WHERE id = ANY(%s)", (list(ids),))
            rows = {r[0]: r[1] for r in await cur.fetchall()}
            await conn.rollback()
            return rows

    async def state_counts(self, ids: Sequence[str] | None = None) -> dict[str, int]:
        async with self._pool.connection() as conn:
            if ids is None:
                cur = await conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")
            else:
                cur = await conn.execute(
                    "SELECT state, count(*) FROM jobs WHERE id = ANY(%s) GROUP BY state",
                    (list(ids),),
                )
            out = {r[0]: int(r[1]) for r in await cur.fetchall()}
            await conn.rollback()
            return out

    async def latencies_ms(self, ids: Sequence[str]) -> tuple[list[float], list[float]]:
        """(submit→start, submit→finish) in ms for finished jobs among ``ids``."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """SELECT extract(epoch from started_at - submitted_at) * 1000,
                          extract(epoch from finished_at - submitted_at) * 1000
                   FROM jobs WHERE id = ANY(%s) AND state = 'succeeded'""",
                (list(ids),),
            )
            rows = await cur.fetchall()
            await conn.rollback()
        return [float(r[0]) for r in rows], [float(r[1]) for r in rows]

    async def dead_letter_count(self) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM dead_letters")
            row = await cur.fetchone()
            await conn.rollback()
            return int(row[0]) if row else 0

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                'SELECT id, topic, partition, "offset", reason, at, '
                "length(value) AS bytes FROM dead_letters ORDER BY id DESC "
                "LIMIT %s",
                (limit,),
            )
            rows = await cur.fetchall()
            await conn.rollback()
            return rows
