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

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from agents.core.lifecycle import CANCEL_FROM, DISPATCH_FROM, FINISHED_FROM, STARTED_FROM
from agents.errors import StoreUnavailable
from streams.events import JobCancelled, JobEvent, JobFailed, JobSpec, JobStarted, JobSucceeded

MIGRATION_LOCK = 7_301_947_113


@dataclass(frozen=True, slots=True)
class Accepted:
    job: JobSpec
    submitted_at: float
    max_attempts: int
    origin: tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class ReadyJob:
    id: str
    tenant: str
    kind: str
    submitted_at: float


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


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str


def _q(text: LiteralString, **fragments: sql.Composable) -> sql.Composed:
    """A query from literal SQL text and fixed SQL fragments (never from input)."""
    return sql.SQL(text).format(**fragments)


def _states(states: Sequence[str]) -> list[str]:
    return [str(s) for s in states]


def migrations() -> list[tuple[int, str, str]]:
    files = sorted((Path(__file__).resolve().parent / "migrations").glob("*.sql"))
    return [(int(p.name.split("_", 1)[0]), p.name, p.read_text()) for p in files]


_READY_COLS = sql.SQL("id, tenant, kind, extract(epoch from submitted_at)::float8 AS submitted_at")
_DISPATCH_COLS = sql.SQL(
    "id, attempt, tenant, kind, args, timeout_s, extract(epoch from submitted_at)::float8, "
    "extract(epoch from dispatched_at)::float8, group_key"
)
_RETURN_STATE = sql.SQL(
    "RETURNING state, attempt, tenant, kind, extract(epoch from submitted_at)::float8"
)


class PostgresJobStore:
    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 4) -> None:
        self.dsn = dsn
        self._pool = AsyncConnectionPool(
            dsn, min_size=min_size, max_size=max_size, open=False, kwargs={"autocommit": False}
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
    async def tx(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        try:
            async with self._pool.connection() as conn:
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

    async def accept(self, batch: Sequence[Accepted]) -> list[ReadyJob]:
        """Persist new jobs (idempotent on id) and return every job of the batch that is ready
        and not yet dispatched, including ones accepted by an earlier, replayed attempt."""
        if not batch:
            return []
        ids = [a.job.id for a in batch]
        async with self.tx() as conn:
            async with conn.cursor() as cur:
                await cur.executemany(
                    """
                    INSERT INTO jobs (id, tenant, kind, group_key, args, priority, size,
                        depends_on, labels, resources, timeout_s, max_attempts, state,
                        gate, submitted_at, ready_at, origin_topic, origin_partition,
                        origin_offset)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
                        to_timestamp(%s), CASE WHEN %s = 'ready' THEN now() END, %s, %s, %s)
                    ON CONFLICT (id) DO NOTHING
                    """,
                    [
                        (
                            a.job.id,
                            a.job.tenant,
                            a.job.kind,
                            a.job.group,
                            Jsonb(a.job.args),
                            a.job.priority,
                            a.job.size,
                            list(a.job.depends_on),
                            list(a.job.labels),
                            list(a.job.resources),
                            a.job.timeout_s,
                            a.max_attempts,
                            "waiting" if a.job.depends_on else "ready",
                            "dependency" if a.job.depends_on else None,
                            a.submitted_at,
                            "waiting" if a.job.depends_on else "ready",
                            *a.origin,
                        )
                        for a in batch
                    ],
                )
                edges = [(a.job.id, d) for a in batch for d in a.job.depends_on]
                if edges:
                    await cur.executemany(
                        "INSERT INTO job_deps (job_id, dep_id) VALUES (%s, %s) "
                        "ON CONFLICT DO NOTHING",
                        edges,
                    )
            await conn.execute(
                "INSERT INTO job_history (job_id, event, detail) SELECT id, 'accepted', "
                "jsonb_build_object('state', state) FROM jobs WHERE id = ANY(%s) AND "
                "accepted_at = now()",
                (ids,),
            )
            await self._fail_doomed(conn, None, ids)
            await self._unlock(conn, ids)
            cur2 = await conn.execute(
                _q(
                    "SELECT {cols} FROM jobs WHERE id = ANY(%s) AND state = 'ready'",
                    cols=_READY_COLS,
                ),
                (ids,),
            )
            return [ReadyJob(*r) for r in await cur2.fetchall()]

    async def _unlock(
        self, conn: psycopg.AsyncConnection[Any], candidates: Sequence[str]
    ) -> list[ReadyJob]:
        """Waiting jobs among ``candidates`` whose every dependency succeeded become ready."""
        if not candidates:
            return []
        cur = await conn.execute(
            _q(
                """
            UPDATE jobs j SET state = 'ready', gate = NULL, ready_at = now(), updated_at = now()
            WHERE j.id = ANY(%s) AND j.state = 'waiting'
              AND NOT EXISTS (SELECT 1 FROM job_deps d LEFT JOIN jobs dj ON dj.id = d.dep_id
                              WHERE d.job_id = j.id AND dj.state IS DISTINCT FROM 'succeeded')
            RETURNING {cols}
            """,
                cols=_READY_COLS,
            ),
            (list(candidates),),
        )
        return [ReadyJob(*r) for r in await cur.fetchall()]

    async def _fail_doomed(
        self,
        conn: psycopg.AsyncConnection[Any],
        roots: Sequence[str] | None,
        candidates: Sequence[str],
    ) -> None:
        """Fail, transitively, waiting jobs that depend on a failed or cancelled job."""
        if roots is None:  # newly accepted jobs whose dependencies already ended badly
            cur = await conn.execute(
                "SELECT DISTINCT d.dep_id FROM job_deps d JOIN jobs dj ON dj.id = d.dep_id "
                "WHERE d.job_id = ANY(%s) AND dj.state IN ('failed', 'cancelled')",
                (list(candidates),),
            )
            roots = [r[0] for r in await cur.fetchall()]
        if not roots:
            return
        await conn.execute(
            """
            WITH RECURSIVE doomed(id, root) AS (
                SELECT d.job_id, d.dep_id FROM job_deps d WHERE d.dep_id = ANY(%(roots)s)
                UNION
                SELECT d.job_id, doomed.root FROM job_deps d JOIN doomed ON d.dep_id = doomed.id
            ), one AS (SELECT DISTINCT ON (id) id, root FROM doomed ORDER BY id, root),
            changed AS (
                UPDATE jobs j SET state = 'failed', gate = NULL, finished_at = now(),
                    updated_at = now(), error = 'dependency ' || one.root || ' did not succeed'
                FROM one WHERE j.id = one.id AND j.state = 'waiting'
                RETURNING j.id, j.error
            )
            INSERT INTO job_history (job_id, event, detail)
            SELECT id, 'failed', jsonb_build_object('reason', error) FROM changed
            """,
            {"roots": list(roots)},
        )

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

    async def claim_for_dispatch(self, ids: Sequence[str]) -> list[DispatchJob]:
        """Move ready jobs to dispatched (a new attempt) and return them with any job of
        ``ids`` whose earlier dispatch was never confirmed (a replay after a crash)."""
        if not ids:
            return []
        async with self.tx() as conn:
            cur = await conn.execute(
                _q(
                    """
                UPDATE jobs SET state = 'dispatched', attempt = attempt + 1, gate = NULL,
                    dispatched_at = now(), dispatch_confirmed = false, updated_at = now()
                WHERE id = ANY(%s) AND state = ANY(%s)
                RETURNING {cols}
                """,
                    cols=_DISPATCH_COLS,
                ),
                (list(ids), _states(DISPATCH_FROM)),
            )
            rows = await cur.fetchall()
            claimed = {r[0] for r in rows}
            rest = [i for i in ids if i not in claimed]
            if rest:
                cur = await conn.execute(
                    _q(
                        "SELECT {cols} FROM jobs WHERE id = ANY(%s) AND state = 'dispatched' "
                        "AND NOT dispatch_confirmed",
                        cols=_DISPATCH_COLS,
                    ),
                    (rest,),
                )
                rows += await cur.fetchall()
        return [DispatchJob(*r) for r in rows]

    async def confirm_dispatch(self, jobs: Sequence[DispatchJob]) -> None:
        if not jobs:
            return
        async with self.tx() as conn:
            await conn.execute(
                """
                UPDATE jobs j SET dispatch_confirmed = true
                FROM unnest(%s::text[], %s::int[]) AS c(id, attempt)
                WHERE j.id = c.id AND j.attempt = c.attempt
                """,
                ([j.id for j in jobs], [j.attempt for j in jobs]),
            )
            await conn.execute(
                "INSERT INTO job_history (job_id, attempt, event) "
                "SELECT * FROM unnest(%s::text[], %s::int[], %s::text[])",
                ([j.id for j in jobs], [j.attempt for j in jobs], ["dispatched"] * len(jobs)),
            )

    # -- outcomes -----------------------------------------------------------------------

    async def apply_events(self, events: Sequence[JobEvent]) -> list[ReadyJob]:
        """Apply lifecycle events in order, guarded; return jobs that became ready (retries
        and dependents unlocked by a success)."""
        ready: list[ReadyJob] = []
        succeeded: list[str] = []
        failed_roots: list[str] = []
        history: list[tuple[str, int, str, Jsonb]] = []
        async with self.tx() as conn:
            for ev in events:
                row = await self._apply_one(conn, ev)
                if row is None:
                    continue
                state = row[0]
                attempt = getattr(ev, "attempt", row[1])
                history.append(
                    (
                        ev.job_id,
                        attempt,
                        state if not isinstance(ev, JobStarted) else "started",
                        Jsonb(_detail(ev)),
                    )
                )
                if state == "succeeded":
                    succeeded.append(ev.job_id)
                elif state in ("failed", "cancelled"):
                    failed_roots.append(ev.job_id)
                elif state == "ready":
                    ready.append(ReadyJob(ev.job_id, row[2], row[3], row[4]))
            if history:
                async with conn.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO job_history (job_id, attempt, event, detail) "
                        "VALUES (%s, %s, %s, %s)",
                        history,
                    )
            if succeeded:
                cur = await conn.execute(
                    "SELECT DISTINCT job_id FROM job_deps WHERE dep_id = ANY(%s)", (succeeded,)
                )
                dependents = [r[0] for r in await cur.fetchall()]
                ready += await self._unlock(conn, dependents)
            if failed_roots:
                await self._fail_doomed(conn, failed_roots, [])
        return ready

    async def _apply_one(
        self, conn: psycopg.AsyncConnection[Any], ev: JobEvent
    ) -> tuple[Any, ...] | None:
        if isinstance(ev, JobStarted):
            cur = await conn.execute(
                _q(
                    """UPDATE jobs SET state = 'running', started_at = to_timestamp(%s),
                    worker = %s, updated_at = now()
                WHERE id = %s AND attempt = %s AND state = ANY(%s) {ret}""",
                    ret=_RETURN_STATE,
                ),
                (ev.at, ev.worker, ev.job_id, ev.attempt, _states(STARTED_FROM)),
            )
        elif isinstance(ev, JobSucceeded):
            cur = await conn.execute(
                _q(
                    """UPDATE jobs SET state = 'succeeded', finished_at = to_timestamp(%s),
                    started_at = coalesce(started_at, to_timestamp(%s)), worker = %s,
                    exit_code = %s, log_path = %s, error = NULL, updated_at = now()
                WHERE id = %s AND attempt = %s AND state = ANY(%s) {ret}""",
                    ret=_RETURN_STATE,
                ),
                (
                    ev.at,
                    ev.at - ev.duration_s,
                    ev.worker,
                    ev.exit_code,
                    ev.log_path,
                    ev.job_id,
                    ev.attempt,
                    _states(FINISHED_FROM),
                ),
            )
        elif isinstance(ev, JobFailed):
            cur = await conn.execute(
                _q(
                    """UPDATE jobs SET
                    state = CASE WHEN %s AND attempt < max_attempts THEN 'ready' ELSE 'failed' END,
                    gate = CASE WHEN %s AND attempt < max_attempts THEN 'retry' END,
                    ready_at = now(), finished_at = to_timestamp(%s), worker = %s,
                    exit_code = %s, error = %s, log_path = %s, updated_at = now()
                WHERE id = %s AND attempt = %s AND state = ANY(%s) {ret}""",
                    ret=_RETURN_STATE,
                ),
                (
                    ev.retryable,
                    ev.retryable,
                    ev.at,
                    ev.worker,
                    ev.exit_code,
                    ev.error[:4000],
                    ev.log_path,
                    ev.job_id,
                    ev.attempt,
                    _states(FINISHED_FROM),
                ),
            )
        elif isinstance(ev, JobCancelled):
            cur = await conn.execute(
                _q(
                    """UPDATE jobs SET state = 'cancelled', finished_at = to_timestamp(%s),
                    error = %s, gate = NULL, updated_at = now()
                WHERE id = %s AND state = ANY(%s) {ret}""",
                    ret=_RETURN_STATE,
                ),
                (ev.at, ev.reason or "cancelled", ev.job_id, _states(CANCEL_FROM)),
            )
        else:  # pragma: no cover - the union is exhaustive
            return None
        return await cur.fetchone()

    async def record_heartbeats(self, beats: Sequence[Any]) -> None:
        if not beats:
            return
        latest = {b.worker: b for b in beats}
        async with self.tx() as conn, conn.cursor() as cur:
            await cur.executemany(
                """
                INSERT INTO workers (id, host, slots_total, slots_free, running, state, last_seen)
                VALUES (%s, %s, %s, %s, %s, %s, to_timestamp(%s))
                ON CONFLICT (id) DO UPDATE SET host = excluded.host,
                    slots_total = excluded.slots_total, slots_free = excluded.slots_free,
                    running = excluded.running, state = excluded.state,
                    last_seen = greatest(workers.last_seen, excluded.last_seen)
                """,
                [
                    (b.worker, b.host, b.slots_total, b.slots_free, b.running, b.state, b.at)
                    for b in latest.values()
                ],
            )

    # -- reconciliation (the safety net) ----------------------------------------------

    async def stale_ready(self, older_than_s: float, limit: int = 10_000) -> list[ReadyJob]:
        async with self.tx() as conn:
            # waiting jobs whose dependencies all succeeded (a race between two agents)
            cur = await conn.execute(
                "SELECT id FROM jobs WHERE state = 'waiting' AND updated_at < "
                "now() - make_interval(secs => %s) LIMIT %s",
                (older_than_s, limit),
            )
            await self._unlock(conn, [r[0] for r in await cur.fetchall()])
            # ready_at moves forward so a job is re-forwarded at most once per period
            cur = await conn.execute(
                _q(
                    """UPDATE jobs SET ready_at = now() WHERE id IN (
                    SELECT id FROM jobs WHERE state = 'ready'
                      AND ready_at < now() - make_interval(secs => %s)
                    ORDER BY ready_at LIMIT %s FOR UPDATE SKIP LOCKED)
                RETURNING {cols}""",
                    cols=_READY_COLS,
                ),
                (older_than_s, limit),
            )
            return [ReadyJob(*r) for r in await cur.fetchall()]

    async def unconfirmed_dispatches(self, older_than_s: float, limit: int = 10_000) -> list[str]:
        async with self.tx() as conn:
            cur = await conn.execute(
                "SELECT id FROM jobs WHERE state = 'dispatched' AND NOT dispatch_confirmed AND "
                "dispatched_at < now() - make_interval(secs => %s) LIMIT %s",
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


def _detail(ev: JobEvent) -> dict[str, Any]:
    if isinstance(ev, JobFailed):
        return {"worker": ev.worker, "error": ev.error[:500], "exit_code": ev.exit_code}
    if isinstance(ev, JobSucceeded):
        return {"worker": ev.worker, "duration_s": ev.duration_s}
    if isinstance(ev, JobStarted):
        return {"worker": ev.worker}
    return {"reason": ev.reason}


def now() -> float:
    return time.time()
