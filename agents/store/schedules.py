"""Periodic schedules' rows: declared (settings file) or added at run time (``jobstream
schedule``), and the pass that moves each schedule's latest handled tick on.

Invariants:
- A pass holds its schedules' rows locked (``FOR UPDATE SKIP LOCKED``) from reading
  ``last_tick`` until the new one is committed: two schedulers never work on the same
  schedule at once, and the one that comes second reads what the first recorded.
- ``last_tick`` only moves forward (``greatest``), whatever a pass computed.
- A schedule created now starts from now: ticks before its creation are not due.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from agents.store.connection import Connections
from agents.store.rows import q

Conn = psycopg.AsyncConnection[Any]
_COLS = sql.SQL(
    "name, cron, tz, job, catch_up, overlap, grace_s, paused, origin, last_tick, last_job, "
    "submitted, skipped"
)


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    name: str
    cron: str
    tz: str
    job: dict[str, Any]  # tenant, kind, args, priority of each tick's job
    catch_up: str
    overlap: str
    grace_s: float
    paused: bool
    origin: str  # 'settings' or 'command'
    last_tick: float
    last_job: str | None
    submitted: int
    skipped: int


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """What a schedule is (the row without its progress)."""

    cron: str
    tz: str
    job: dict[str, Any]
    catch_up: str = "latest"
    overlap: str = "allow"
    grace_s: float = 60.0


@dataclass(frozen=True, slots=True)
class PassRecord:
    name: str
    last_tick: float
    last_job: str | None
    submitted: int
    skipped: int


class SchedulePass:
    """One pass's view: the schedules it holds locked, in its transaction."""

    def __init__(self, conn: Conn, rows: list[ScheduleRow]) -> None:
        self.conn = conn
        self.rows = rows

    async def unfinished(self, job_ids: Sequence[str]) -> set[str]:
        """The jobs of ``job_ids`` that exist and have not ended."""
        if not job_ids:
            return set()
        cur = await self.conn.execute(
            "SELECT id FROM jobs WHERE id = ANY(%s) "
            "AND state NOT IN ('succeeded', 'failed', 'cancelled')",
            (list(job_ids),),
        )
        return {r[0] for r in await cur.fetchall()}

    async def record(self, records: Sequence[PassRecord]) -> None:
        if not records:
            return
        await self.conn.execute(
            """UPDATE schedules s SET last_tick = greatest(s.last_tick, r.last_tick),
                   last_job = coalesce(r.last_job, s.last_job),
                   submitted = s.submitted + r.submitted, skipped = s.skipped + r.skipped
               FROM unnest(%s::text[], %s::float8[], %s::text[], %s::bigint[], %s::bigint[])
                    AS r(name, last_tick, last_job, submitted, skipped)
               WHERE s.name = r.name""",
            (
                [r.name for r in records],
                [r.last_tick for r in records],
                [r.last_job for r in records],
                [r.submitted for r in records],
                [r.skipped for r in records],
            ),
        )


_UPSERT = """
INSERT INTO schedules (name, cron, tz, job, catch_up, overlap, grace_s, origin, last_tick)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (name) DO UPDATE SET cron = excluded.cron, tz = excluded.tz, job = excluded.job,
    catch_up = excluded.catch_up, overlap = excluded.overlap, grace_s = excluded.grace_s,
    origin = excluded.origin, updated_at = now()
RETURNING (xmax = 0) AS created
"""


def _upsert_params(name: str, spec: ScheduleSpec, origin: str, now: float) -> tuple[Any, ...]:
    return (
        name,
        spec.cron,
        spec.tz,
        Jsonb(spec.job),
        spec.catch_up,
        spec.overlap,
        spec.grace_s,
        origin,
        now,
    )


class ScheduleStore(Connections):
    """Schedules: the operator's changes, the settings' declarations and the passes."""

    async def put_schedule(self, name: str, spec: ScheduleSpec, now: float) -> bool:
        """Add a schedule, or change one (its progress kept); True when it is new."""
        async with self.tx() as conn:
            cur = await conn.execute(_UPSERT, _upsert_params(name, spec, "command", now))
            row = await cur.fetchone()
            return bool(row and row[0])

    async def declare_schedules(self, specs: Mapping[str, ScheduleSpec], now: float) -> None:
        """The settings file's schedules as they are now: added or changed, and those it
        declared before and no longer does removed (run-time ones are left alone)."""
        async with self.tx() as conn:
            for name, spec in specs.items():
                await conn.execute(_UPSERT, _upsert_params(name, spec, "settings", now))
            await conn.execute(
                "DELETE FROM schedules WHERE origin = 'settings' AND name <> ALL(%s)",
                (list(specs),),
            )

    async def remove_schedule(self, name: str) -> bool:
        async with self.tx() as conn:
            cur = await conn.execute("DELETE FROM schedules WHERE name = %s", (name,))
            return cur.rowcount > 0

    async def pause_schedule(self, name: str, paused: bool, now: float) -> bool:
        """Pause or resume; a resumed schedule goes on from now (ticks while it was paused
        are not due)."""
        async with self.tx() as conn:
            cur = await conn.execute(
                """UPDATE schedules SET paused = %s, updated_at = now(),
                       last_tick = CASE WHEN paused AND NOT %s THEN greatest(last_tick, %s)
                                        ELSE last_tick END
                   WHERE name = %s""",
                (paused, paused, now, name),
            )
            return cur.rowcount > 0

    async def schedules(self) -> list[ScheduleRow]:
        async with self.reading() as conn:
            cur = await conn.execute(q("SELECT {cols} FROM schedules ORDER BY name", cols=_COLS))
            return [ScheduleRow(*r) for r in await cur.fetchall()]

    @asynccontextmanager
    async def schedule_pass(self) -> AsyncIterator[SchedulePass]:
        """The running schedules no other pass holds, locked until the pass commits."""
        async with self.tx() as conn:
            cur = await conn.execute(
                q(
                    "SELECT {cols} FROM schedules WHERE NOT paused "
                    "ORDER BY name FOR UPDATE SKIP LOCKED",
                    cols=_COLS,
                )
            )
            yield SchedulePass(conn, [ScheduleRow(*r) for r in await cur.fetchall()])


__all__ = ["PassRecord", "SchedulePass", "ScheduleRow", "ScheduleSpec", "ScheduleStore"]
