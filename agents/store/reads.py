"""Read-side queries for operators (``jobstream status``, ``jobs``, the status page, dead
letter replay): every one answers from indexes, so it stays fast with millions of jobs.

Invariants: read-only except :func:`mark_replayed`; parameterized SQL only; terminal jobs are
counted over a recent window (``finished_at`` index), never by scanning history.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row

from agents.store.jobstore import PostgresJobStore

ACTIVE_STATES = ("waiting", "ready", "dispatched", "running")


async def status(store: PostgresJobStore, window_s: float = 300.0) -> dict[str, Any]:
    """Queues per tenant and kind, recent throughput and failures, workers, gates, brake."""
    async with store._pool.connection() as conn:
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
            """SELECT state, count(*)::int AS n,
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY
                        extract(epoch from started_at - submitted_at) * 1000) AS start_p50_ms,
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY
                        extract(epoch from started_at - submitted_at) * 1000) AS start_p99_ms
               FROM jobs WHERE finished_at > now() - make_interval(secs => %s)
                 AND state IN ('succeeded', 'failed', 'cancelled')
               GROUP BY state""",
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
        await conn.rollback()
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


def _round(x: Any) -> float | None:
    return None if x is None else round(float(x), 1)


async def jobs(
    store: PostgresJobStore,
    *,
    tenant: str | None = None,
    kind: str | None = None,
    state: str | None = None,
    since: datetime | None = None,
    after: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Newest first; ``after``: the last id of the previous page (keyset paging)."""
    async with store._pool.connection() as conn:
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
        await conn.rollback()
        return rows


async def recent_failures(store: PostgresJobStore, limit: int = 20) -> list[dict[str, Any]]:
    async with store._pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            """SELECT id, tenant, kind, state, attempt, error, finished_at FROM jobs
               WHERE state IN ('failed', 'cancelled') AND finished_at IS NOT NULL
               ORDER BY finished_at DESC LIMIT %s""",
            (limit,),
        )
        rows = await cur.fetchall()
        await conn.rollback()
        return rows


async def dead_letter(store: PostgresJobStore, dl_id: int) -> dict[str, Any] | None:
    async with store._pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            'SELECT id, topic, partition, "offset", key, value, reason, at, replayed_at '
            "FROM dead_letters WHERE id = %s",
            (dl_id,),
        )
        row = await cur.fetchone()
        await conn.rollback()
        return row


async def dead_letters_to_replay(
    store: PostgresJobStore, ids: Sequence[int] | None, topic: str | None, force: bool
) -> list[dict[str, Any]]:
    async with store._pool.connection() as conn:
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
        await conn.rollback()
        return rows


async def mark_replayed(store: PostgresJobStore, ids: Sequence[int]) -> None:
    async with store.tx() as conn:
        await conn.execute(
            "UPDATE dead_letters SET replayed_at = now() WHERE id = ANY(%s)", (list(ids),)
        )
