"""Workers' liveness and capacity: heartbeats, lost workers and their work, host load and
the brake."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg.rows import dict_row

from agents.core import brake as brake_core
from agents.core.brake import HostSample, Thresholds
from agents.core.semaphores import GLOBAL, SLOTS
from agents.store.admission import (
    live_slots,
    refresh_capacity,
    release_attempt_holds,
)
from agents.store.connection import Connections
from agents.store.rows import (
    CONFIRMED,
    q,
)

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
    # it holds more than a slot and its global share (a licence, an exclusive scope): its
    # retry keeps them until no live worker runs or holds the attempt (its dispatch,
    # redelivered to the partition's next owner, may start there before the retry lands)
    shared: bool = False


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


class LivenessStore(Connections):
    """Heartbeats, the liveness monitor's step, host load and the brake."""

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
                          extract(epoch from now() - w.last_seen)::float8,
                          EXISTS (SELECT 1 FROM job_holds h
                                  LEFT JOIN semaphores s ON s.name = h.name
                                  WHERE h.job_id = j.id AND h.attempt = j.attempt
                                    AND (h.name NOT IN (%s, %s) OR h.amount >= s.capacity))
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
                (SLOTS, GLOBAL, lost_after_s),
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
            static = int(await live_slots(conn, lost_after_s) * capacity_factor)
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
        async with self.reading() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute("SELECT target, static, reason, at FROM brake WHERE name = 'slots'")
            row = await cur.fetchone()
            return row

    async def workers(self) -> list[dict[str, Any]]:
        async with self.reading() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                """SELECT id, host, state, slots_total, slots_free, running, labels, load, pid,
                          first_seen, last_seen, lost_at,
                          extract(epoch from now() - last_seen)::float8 AS silent_s
                   FROM workers ORDER BY state = 'running' DESC, last_seen DESC"""
            )
            rows = await cur.fetchall()
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
