"""Read-side queries for operators (``jobstream status``, ``jobs``, the status page, dead
letter replay): every one answers from indexes, so it stays fast with millions of jobs.

Invariants: read-only except :func:`mark_replayed`; parameterized SQL only; terminal jobs are
counted over a recent window (``finished_at`` index), never by scanning history.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from agents.store.connection import Connections
from agents.store.rows import q

# when a job could first run: submitted, or released by its dependencies, and not before its
# run_at (the start latency the status views report counts from it)
COULD_RUN_AT = sql.SQL(
    "SELECT greatest(CASE WHEN cardinality(depends_on) = 0 AND order_key IS NULL "
    "THEN submitted_at ELSE coalesce(ready_at, submitted_at) END, run_at) AS could_run_at"
)

ACTIVE_STATES = ("waiting", "ready", "dispatched", "running")


def _round(x: Any) -> float | None:
    return None if x is None else round(float(x), 1)


class ReadStore(Connections):
    """The operator's reads: a job, a workflow, why a job waits, queues, dead letters."""

    async def status(self, window_s: float = 300.0) -> dict[str, Any]:
        """Queues per tenant and kind, recent throughput and failures, workers, gates, brake."""
        async with self.reading() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                """SELECT tenant, kind, state, count(*)::int AS n FROM jobs
                   WHERE state = ANY(%s) GROUP BY tenant, kind, state ORDER BY tenant, kind""",
                (list(ACTIVE_STATES),),
            )
            queues: dict[tuple[str, str], dict[str, int]] = {}
            for r in await cur.fetchall():
                queues.setdefault((r["tenant"], r["kind"]), {})[r["state"]] = r["n"]
            await cur.execute(
                q(
                    """SELECT state, count(*)::int AS n,
                          percentile_cont(0.5) WITHIN GROUP (ORDER BY
                            extract(epoch from started_at - could_run_at) * 1000) AS start_p50_ms,
                          percentile_cont(0.99) WITHIN GROUP (ORDER BY
                            extract(epoch from started_at - could_run_at) * 1000) AS start_p99_ms
                   FROM jobs, LATERAL ({could_run_at}) c
                   WHERE finished_at > now() - make_interval(secs => %s)
                     AND state IN ('succeeded', 'failed', 'cancelled')
                   GROUP BY state""",
                    could_run_at=COULD_RUN_AT,
                ),
                (window_s,),
            )
            finished = {r["state"]: r for r in await cur.fetchall()}
            await cur.execute(
                """SELECT split_part(gate, ':', 1) AS gate, count(*)::int AS n FROM jobs
                   WHERE state = 'ready' AND gate IS NOT NULL GROUP BY 1 ORDER BY 2 DESC"""
            )
            gates = {r["gate"]: r["n"] for r in await cur.fetchall()}
            await cur.execute(
                """SELECT id, state, slots_total, slots_free, labels, load,
                          extract(epoch from now() - last_seen)::float8 AS silent_s
                   FROM workers WHERE state <> 'stopped' OR last_seen > now() - interval '1 hour'
                   ORDER BY id"""
            )
            workers = await cur.fetchall()
            await cur.execute("SELECT target, static, reason FROM brake WHERE name = 'slots'")
            brake = await cur.fetchone()
            await cur.execute(
                """SELECT count(*)::int AS n FROM dead_letters
                   WHERE at > now() - make_interval(secs => %s)""",
                (window_s,),
            )
            dl = await cur.fetchone()
        done = sum(r["n"] for r in finished.values())
        return {
            "window_s": window_s,
            "queues": [
                {"tenant": t, "kind": k, **{s: c.get(s, 0) for s in ACTIVE_STATES}}
                for (t, k), c in sorted(queues.items())
            ],
            "totals": {s: sum(c.get(s, 0) for c in queues.values()) for s in ACTIVE_STATES},
            "finished": {
                s: finished[s]["n"] if s in finished else 0
                for s in ("succeeded", "failed", "cancelled")
            },
            "jobs_per_s": round(done / window_s, 2),
            "start_latency_ms": {
                "p50": _round(finished.get("succeeded", {}).get("start_p50_ms")),
                "p99": _round(finished.get("succeeded", {}).get("start_p99_ms")),
            },
            "gates": gates,
            "workers": workers,
            "brake": brake,
            "dead_letters_recent": dl["n"] if dl else 0,
        }

    async def recent_sample(self, window_s: float) -> tuple[int, int, Any, Any, int, int]:
        """The status page's sample: successes and failures over the last ``window_s``, their
        submit→start p50 and p99 (ms, None without any), the ready and the running jobs."""
        async with self.reading() as conn:
            cur = await conn.execute(
                q(
                    """SELECT count(*) FILTER (WHERE state = 'succeeded'),
                          count(*) FILTER (WHERE state IN ('failed', 'cancelled')),
                          percentile_cont(0.5) WITHIN GROUP (ORDER BY
                            extract(epoch from started_at - could_run_at) * 1000),
                          percentile_cont(0.99) WITHIN GROUP (ORDER BY
                            extract(epoch from started_at - could_run_at) * 1000)
                   FROM jobs, LATERAL ({could_run_at}) c
                   WHERE finished_at > now() - make_interval(secs => %s)""",
                    could_run_at=COULD_RUN_AT,
                ),
                (window_s,),
            )
            ok, bad, p50, p99 = await cur.fetchone() or (0, 0, None, None)
            cur = await conn.execute(
                "SELECT count(*) FILTER (WHERE state = 'ready'), "
                "count(*) FILTER (WHERE state IN ('dispatched', 'running')) "
                "FROM jobs WHERE state IN ('ready', 'dispatched', 'running')"
            )
            ready, running = await cur.fetchone() or (0, 0)
        return ok, bad, p50, p99, ready, running

    async def jobs(
        self,
        *,
        tenant: str | None = None,
        kind: str | None = None,
        state: str | None = None,
        since: datetime | None = None,
        after: str | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Newest first; ``after``: the last id of the previous page (keyset paging)."""
        async with self.reading() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                """SELECT id, tenant, kind, state, attempt, gate, worker, error, accepted_at,
                          started_at, finished_at
                   FROM jobs
                   WHERE (%(tenant)s::text IS NULL OR tenant = %(tenant)s)
                     AND (%(kind)s::text IS NULL OR kind = %(kind)s)
                     AND (%(state)s::text IS NULL OR state = %(state)s)
                     AND (%(since)s::timestamptz IS NULL OR accepted_at >= %(since)s)
                     AND (%(after)s::text IS NULL OR (accepted_at, id) <
                          (SELECT accepted_at, id FROM jobs WHERE id = %(after)s))
                   ORDER BY accepted_at DESC, id DESC LIMIT %(limit)s""",
                {
                    "tenant": tenant,
                    "kind": kind,
                    "state": state,
                    "since": since,
                    "after": after,
                    "limit": limit,
                },
            )
            rows = await cur.fetchall()
            return rows

    async def recent_failures(self, limit: int = 20) -> list[dict[str, Any]]:
        async with self.reading() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                """SELECT id, tenant, kind, state, attempt, error, finished_at FROM jobs
                   WHERE state IN ('failed', 'cancelled') AND finished_at IS NOT NULL
                   ORDER BY finished_at DESC LIMIT %s""",
                (limit,),
            )
            rows = await cur.fetchall()
            return rows

    async def dead_letter(self, dl_id: int) -> dict[str, Any] | None:
        async with self.reading() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                'SELECT id, topic, partition, "offset", key, value, reason, at, replayed_at '
                "FROM dead_letters WHERE id = %s",
                (dl_id,),
            )
            row = await cur.fetchone()
            return row

    async def dead_letters_to_replay(
        self, ids: Sequence[int] | None, topic: str | None, force: bool
    ) -> list[dict[str, Any]]:
        async with self.reading() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                """SELECT id, topic, key, value FROM dead_letters
                   WHERE (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))
                     AND (%(topic)s::text IS NULL OR topic = %(topic)s)
                     AND (%(force)s OR replayed_at IS NULL)
                   ORDER BY id""",
                {"ids": list(ids) if ids else None, "topic": topic, "force": force},
            )
            rows = await cur.fetchall()
            return rows

    async def mark_replayed(self, ids: Sequence[int]) -> None:
        async with self.tx() as conn:
            await conn.execute(
                "UPDATE dead_letters SET replayed_at = now() WHERE id = ANY(%s)", (list(ids),)
            )

    async def job(self, job_id: str) -> dict[str, Any] | None:
        async with self.reading() as conn:
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
            return row

    async def workflow(self, workflow_id: str) -> list[dict[str, Any]]:
        """Jobs of a workflow (or dependency group) with their dependencies, in submission
        order."""
        async with self.reading() as conn:
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
            return rows

    async def why(
        self, job_id: str, labels: Sequence[str] = (), lost_after_s: float = 15.0
    ) -> dict[str, Any] | None:
        """A job's state and gate, its worker, and the state of each job it waits on;
        ``labels``: its kind's pool, to count the live workers that carry them."""
        async with self.reading() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                "SELECT j.id, j.tenant, j.kind, j.state, j.gate, j.gate_until, j.priority, j.size, "
                "j.error, j.root_cause, j.attempt, j.max_attempts, j.trigger, j.accepted_at, "
                "j.ready_at, extract(epoch from j.run_after)::float8 AS run_after, "
                "extract(epoch from j.run_at)::float8 AS run_at, j.worker, "
                "j.progress, j.not_before, w.state AS worker_state, "
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
            return row

    async def state_counts(self, ids: Sequence[str] | None = None) -> dict[str, int]:
        async with self.reading() as conn:
            if ids is None:
                cur = await conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")
            else:
                cur = await conn.execute(
                    "SELECT state, count(*) FROM jobs WHERE id = ANY(%s) GROUP BY state",
                    (list(ids),),
                )
            out = {r[0]: int(r[1]) for r in await cur.fetchall()}
            return out

    async def latencies_ms(self, ids: Sequence[str]) -> tuple[list[float], list[float]]:
        """(submit→start, submit→finish) in ms for finished jobs among ``ids``."""
        async with self.reading() as conn:
            cur = await conn.execute(
                """SELECT extract(epoch from started_at - submitted_at) * 1000,
                          extract(epoch from finished_at - submitted_at) * 1000
                   FROM jobs WHERE id = ANY(%s) AND state = 'succeeded'""",
                (list(ids),),
            )
            rows = await cur.fetchall()
        return [float(r[0]) for r in rows], [float(r[1]) for r in rows]

    async def job_times(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Each job of ``ids``: tenant, state, root cause and its times (epoch seconds)."""
        async with self.reading() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                """SELECT id, tenant, kind, state, root_cause,
                          extract(epoch from submitted_at)::float8 AS submitted,
                          extract(epoch from accepted_at)::float8 AS accepted,
                          extract(epoch from run_at)::float8 AS run_at,
                          extract(epoch from started_at)::float8 AS started,
                          extract(epoch from finished_at)::float8 AS finished
                   FROM jobs WHERE id = ANY(%s)""",
                (list(ids),),
            )
            return await cur.fetchall()

    async def admissions(self, key: str, since: float) -> list[float]:
        """Admission times a rate-limit key counted since an instant (its window log)."""
        async with self.reading() as conn:
            cur = await conn.execute(
                "SELECT at FROM rate_log WHERE key = %s AND at >= %s ORDER BY at", (key, since)
            )
            return [float(r[0]) for r in await cur.fetchall()]

    async def dead_letter_count(self) -> int:
        async with self.reading() as conn:
            cur = await conn.execute("SELECT count(*) FROM dead_letters")
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        async with self.reading() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                'SELECT id, topic, partition, "offset", reason, at, '
                "length(value) AS bytes FROM dead_letters ORDER BY id DESC "
                "LIMIT %s",
                (limit,),
            )
            rows = await cur.fetchall()
            return rows
