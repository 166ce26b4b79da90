"""The rate limits' durable window log (``rate_log``): one entry per admission against a
limited key, in admission order (``seq``), with the attempt it admitted and, once known, its
start. The admission transaction reads a key's entries under the key's lock: its admissions
in the window (the limit at admission) and what bounds its next admissions' starts
(``agents.core.startlimit``: an entry is resolved once its start is recorded, or once its
attempt is no longer dispatched or running)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from agents.core.startlimit import UNSTARTED, batch_not_before
from agents.store.rows import q

Conn = psycopg.AsyncConnection[Any]


async def rate_log_since(
    conn: Conn, since: float, keys: Sequence[str] | None = None
) -> dict[str, list[float]]:
    if keys is None:
        cur = await conn.execute(
            "SELECT key, at FROM rate_log WHERE at > %s ORDER BY key, at", (since,)
        )
    else:
        cur = await conn.execute(
            "SELECT key, at FROM rate_log WHERE key = ANY(%s) AND at > %s ORDER BY key, at",
            (list(keys), since),
        )
    out: dict[str, list[float]] = defaultdict(list)
    for key, at in await cur.fetchall():
        out[key].append(at)
    return out


class RateState(NamedTuple):
    """What the locked window keys allow: each key's admissions in ``(now - W, now]``, and
    the not-befores of its next admissions (``agents.core.startlimit.batch_not_before``:
    the list ends where an admission must wait for a start)."""

    counts: dict[str, int]
    not_before: dict[str, list[float]]


NO_RATES = RateState({}, {})

# an entry of the window log is resolved once its start is known, or when its attempt is no
# longer dispatched or running (it ended unstarted); entries of older versions have a start
_RESOLVED = """(r.started_at IS NOT NULL OR r.job_id IS NULL OR NOT EXISTS (
    SELECT 1 FROM jobs j WHERE j.id = r.job_id AND j.attempt = r.attempt
    AND j.state IN ('dispatched', 'running')))"""

_RATE_STATE = """
WITH k AS (SELECT * FROM unnest(%(keys)s::text[], %(n)s::int[], %(w)s::float8[]) AS k(key, n, w)),
recent AS (
    SELECT k.key, r.seq, r.job_id, r.started_at, {resolved} AS resolved
    FROM k CROSS JOIN LATERAL (
        SELECT seq, job_id, attempt, started_at FROM rate_log r
        WHERE r.key = k.key ORDER BY seq DESC LIMIT k.n) r),
edge AS (SELECT key, min(seq) AS first, count(*) AS have FROM recent GROUP BY key)
SELECT k.key, 'count', 0::bigint, NULL::text,
       (SELECT count(*) FROM rate_log r WHERE r.key = k.key AND r.at > %(now)s - k.w)::float8,
       true
FROM k
UNION ALL
SELECT key, 'recent', seq, job_id, started_at, resolved FROM recent
UNION ALL
SELECT e.key, 'older', 0::bigint, NULL::text,
       (SELECT max(r.started_at) FROM rate_log r
        WHERE r.key = e.key AND r.seq < e.first AND r.started_at > %(now)s - k.w),
       NOT EXISTS (SELECT 1 FROM rate_log r WHERE r.key = e.key AND r.seq < e.first
                   AND r.started_at IS NULL AND NOT {resolved})
FROM edge e JOIN k ON k.key = e.key WHERE e.have >= k.n
"""


class KeyLog(NamedTuple):
    """One key's window log as the start-time limiter needs it: admissions in the window,
    the latest entries newest first (job id, start: a time, ``UNSTARTED``, or None while
    unresolved), and of the older ones the latest start and whether all are resolved."""

    admitted: int
    recent: list[tuple[str | None, float | None]]
    older_floor: float
    older_resolved: bool


async def rate_state(conn: Conn, limits: Mapping[str, tuple[int, float]], now: float) -> RateState:
    """Lock the window keys (``limits``: key → its limit and window; in key order), then
    read what each allows: its admissions in the window, and the not-befores of its next
    admissions (one round trip for the reads; none without keys)."""
    keys = sorted(limits)
    if not keys:
        return NO_RATES
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended(k, 7041)) "
        "FROM unnest(%s::text[]) AS k ORDER BY k",
        (keys,),
    )
    logs = await key_logs(conn, limits, now)
    return RateState(
        {k: log.admitted for k, log in logs.items()},
        {
            k: batch_not_before(
                [s for _, s in log.recent], log.older_floor, log.older_resolved, *limits[k]
            )
            for k, log in logs.items()
        },
    )


async def key_logs(
    conn: Conn, limits: Mapping[str, tuple[int, float]], now: float
) -> dict[str, KeyLog]:
    """Each key's log (``limits``: key → its limit and window), in one statement."""
    keys = sorted(limits)
    cur = await conn.execute(
        q(_RATE_STATE, resolved=sql.SQL(_RESOLVED)),
        {
            "keys": keys,
            "n": [limits[k][0] for k in keys],
            "w": [limits[k][1] for k in keys],
            "now": now,
        },
    )
    counts: dict[str, int] = {}
    recent: dict[str, list[tuple[int, str | None, float | None]]] = defaultdict(list)
    older: dict[str, tuple[float, bool]] = {}
    for key, part, seq, job_id, value, resolved in await cur.fetchall():
        if part == "count":
            counts[key] = int(value)
        elif part == "recent":
            start = value if value is not None else (UNSTARTED if resolved else None)
            recent[key].append((seq, job_id, start))
        else:
            older[key] = (-math.inf if value is None else value, resolved)
    out = {}
    for key in keys:
        latest = [(j, s) for _, j, s in sorted(recent.get(key, []), reverse=True)]
        floor, resolved = older.get(key, (-math.inf, True))
        out[key] = KeyLog(counts.get(key, 0), latest, floor, resolved)
    return out
