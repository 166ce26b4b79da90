"""The ticker: periodic schedules' due ticks submitted as jobs.

Every scheduler runs one. A pass locks the running schedules no other pass holds
(``agents.store.schedules``), asks the core which due ticks to submit
(``agents.core.schedules.plan``: catch-up and overlap policies), publishes one
``job.submitted`` per tick on ``jobs.independent`` (id ``schedule:NAME:<tick>``, ``run_at``
the tick), waits for the broker's acknowledgement, then records the latest tick handled and
commits. The pass sleeps until the next tick of any schedule (at most ``IDLE_S``: a schedule
added or changed at run time is seen within that).

Invariants:
- A tick is submitted at or after its instant, never before (``plan``).
- Exactly one job per tick, however many schedulers run and whatever restarts: the id is
  the tick's, and intake inserts a job id once; a pass that crashes after publishing and
  before its commit publishes the same ids again, which change nothing.
- ``last_tick`` is recorded only after the broker has every job of the pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from agents.context import Context, retrying
from agents.core.schedules import Cron, ScheduleError, TickPlan, plan, tick_job_id
from agents.errors import StoreUnavailable
from agents.settings import ScheduleConfig
from agents.store.schedules import PassRecord, ScheduleRow, ScheduleSpec
from streams.events import JobSpec, JobSubmitted, encode
from streams.kafka import Record

log = logging.getLogger("jobstream.ticker")
IDLE_S = 1.0  # the longest a pass sleeps: run-time changes are seen within it


def spec_of(cfg: ScheduleConfig) -> ScheduleSpec:
    """A schedule as the settings file declares it, as the store keeps it."""
    return ScheduleSpec(
        cfg.cron,
        cfg.tz,
        {"tenant": cfg.tenant, "kind": cfg.kind, "args": cfg.args, "priority": cfg.priority},
        cfg.catch_up,
        cfg.overlap,
        cfg.grace_s,
    )


class Ticker:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._crons: dict[tuple[str, str], Cron] = {}

    def cron(self, row: ScheduleRow) -> Cron:
        key = (row.cron, row.tz)
        c = self._crons.get(key)
        if c is None:
            c = self._crons[key] = Cron(row.cron, row.tz)
        return c

    async def run(self) -> None:
        store = await self.ctx.store()
        declared = {n: spec_of(c) for n, c in self.ctx.settings.schedules.items()}
        await retrying("declare schedules", lambda: store.declare_schedules(declared, time.time()))
        while True:
            try:
                next_at = await self.pass_once(time.time())
            except asyncio.CancelledError:
                raise
            except (StoreUnavailable, OSError) as exc:
                log.warning("ticker: %s; next pass in %.0f s", exc, IDLE_S)
                next_at = None
            except Exception:
                log.exception("ticker pass failed; next pass in %.0f s", IDLE_S)
                next_at = None
            now = time.time()
            wait = IDLE_S if next_at is None else min(IDLE_S, max(0.0, next_at - now))
            await asyncio.sleep(wait)

    async def pass_once(self, now: float) -> float | None:
        """Submit every schedule's due ticks; return the next tick of any of them."""
        store = await self.ctx.store()
        async with store.schedule_pass() as p:
            if not p.rows:
                return None
            plans: dict[str, TickPlan] = {}
            skipping = [r.last_job for r in p.rows if r.overlap == "skip" and r.last_job]
            running = await p.unfinished(skipping)
            for row in p.rows:
                try:
                    plans[row.name] = plan(
                        self.cron(row),
                        row.last_tick,
                        now,
                        catch_up=row.catch_up,  # type: ignore[arg-type]
                        overlap=row.overlap,  # type: ignore[arg-type]
                        grace_s=row.grace_s,
                        previous_running=row.last_job in running,
                    )
                except ScheduleError as exc:  # a row written past the checks: said, skipped
                    log.error("schedule %s: %s", row.name, exc)
            records = [
                self._record(row, tp)
                for row in p.rows
                if (tp := plans.get(row.name)) and (tp.last > row.last_tick or tp.submit)
            ]
            jobs = [
                self._job(row, tick) for row in p.rows for tick in plans.get(row.name, _NONE).submit
            ]
            if jobs:
                await self.ctx.producer.aproduce(jobs)
                log.info("ticker: submitted %d tick(s)", len(jobs))
            for r in records:
                if r.skipped:
                    log.info("schedule %s: %d tick(s) skipped (policy)", r.name, r.skipped)
            await p.record(records)
            return self._next(p.rows, plans, now)

    def _record(self, row: ScheduleRow, tp: TickPlan) -> PassRecord:
        last_job = tick_job_id(row.name, tp.submit[-1]) if tp.submit else None
        return PassRecord(row.name, tp.last, last_job, len(tp.submit), tp.skipped)

    def _job(self, row: ScheduleRow, tick: float) -> Record:
        t: dict[str, Any] = row.job
        spec = JobSpec(
            id=tick_job_id(row.name, tick),
            tenant=t["tenant"],
            kind=t["kind"],
            args=t.get("args") or {},
            priority=t.get("priority", 0),
            run_at=tick,
        )
        value = encode(JobSubmitted(job=spec, submitted_at=time.time()))
        return Record(self.ctx.topic("jobs.independent"), value, spec.id.encode())

    def _next(self, rows: list[ScheduleRow], plans: dict[str, TickPlan], now: float) -> float:
        """The next tick after ``now`` of any schedule (within the idle wait)."""
        best = now + IDLE_S
        for row in rows:
            tp = plans.get(row.name)
            if tp is None:
                continue
            ticks = self.cron(row).ticks(max(now, tp.last), best, limit=1)
            if ticks:
                best = min(best, ticks[0])
        return best


_NONE = TickPlan((), 0, 0.0)
