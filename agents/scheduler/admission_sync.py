"""What an admission owner keeps in step with its partitions and with PostgreSQL: which
tenants it owns (queued jobs of tenants it lost are handed over), the ready jobs of its
tenants (re-read every ``admission_resync_s``), the rate limits' window logs (rebuilt from the
durable log; a key waiting for a start is read again every ``START_READ_S``: the start may
have been recorded by another scheduler, or the attempt ended unstarted), and the operator's
controls (pauses, limits, priorities)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agents.context import retrying
from agents.core.admission import START_WAIT, Decisions
from agents.core.ratelimit import Limit
from agents.core.startlimit import StartLog
from agents.scheduler.intake import ready_records
from agents.store import admission as admstore
from agents.store import ratelog
from agents.store.rows import QueuedRow
from streams.kafka import partition_for

if TYPE_CHECKING:
    from agents.scheduler.admission import Admission

log = logging.getLogger("jobstream.admission")

# how often a key whose next admission waits for a start is read again from PostgreSQL
START_READ_S = 0.2


def start_waits(d: Decisions) -> set[str]:
    """The rate-limit keys a decision found waiting for a start."""
    return {
        g.detail.split(" ", 1)[0]
        for g in d.gates.values()
        if g.kind == "rate_limit" and g.detail.endswith(START_WAIT)
    }


class Sync:
    """The admission owner's bookkeeping against its partitions and PostgreSQL."""

    def __init__(self, adm: Admission) -> None:
        self.adm = adm

    async def ownership(self, now: float) -> None:
        """Follow the partitions of ``jobs.ready`` this process owns: queued jobs of tenants
        it lost go to their new owner, window logs are rebuilt, ready jobs re-read."""
        a = self.adm
        assigned = a.assigned()
        if assigned is None:
            return
        changed = assigned != a.owned
        taken, a.taken_locally = a.taken_locally, {}
        if not changed and now < a.next_resync:
            return
        if changed:
            keep = [t for t in a.core.queues if partition_for(t.encode(), a.partitions) in assigned]
            dropped = a.core.drop_tenants(keep)
            lost = [taken[i] for i in dropped if i in taken]
            if lost:
                await retrying(
                    "hand over", lambda: a.ctx.producer.aproduce(ready_records(a.ctx, lost))
                )
            if dropped or a.owned is not None:
                log.info(
                    "admission: partitions %s (was %s); handed over %d queued jobs",
                    sorted(assigned),
                    sorted(a.owned or ()),
                    len(dropped),
                )
            a.forget_gates()
            a.owned = set(assigned)
            await self.reload_rate_log(None, now)
        await self.resync(now)
        a.next_resync = now + a.ctx.settings.admission_resync_s

    async def resync(self, now: float) -> None:
        """Queue every ready job of the tenants owned here (idempotent)."""
        a = self.adm
        store = await a.ctx.store()

        async def load() -> list[QueuedRow]:
            async with store.tx() as conn:
                tenants = [t for t in await admstore.ready_tenants(conn) if a.owns(t)]
                return await admstore.load_ready_of(conn, tenants)

        rows = await retrying("admission resync", load)
        added = a.enqueue(rows, now)
        if added:
            log.info("admission: queued %d ready jobs from PostgreSQL", added)

    async def reload_rate_log(self, keys: Sequence[str] | None, now: float) -> None:
        """Rebuild window logs from the durable log: all of them (ownership changed) or the
        given keys (another process admitted against them)."""
        a = self.adm
        rates = a.core.rates
        horizon = rates.horizon()
        if not horizon:
            return
        store = await a.ctx.store()

        async def load() -> dict[str, list[float]]:
            async with store.tx() as conn:
                return await ratelog.rate_log_since(conn, now - horizon, keys)

        logs = await retrying("rate log", load)
        for key in keys if keys is not None else list(logs):
            lim = rates.limit_of(key)
            if lim is not None:
                rates.load(key, logs.get(key, []), lim.limit)
        await self.reload_starts(keys if keys is not None else list(logs), now)

    async def starts(self, now: float) -> None:
        """Read again the keys a decision found waiting for a start, at most every
        ``START_READ_S``."""
        a = self.adm
        if a.start_waits and now >= a.starts_read_at:
            a.starts_read_at = now + START_READ_S
            await self.reload_starts(sorted(a.start_waits), now)

    async def reload_starts(self, keys: Sequence[str], now: float) -> None:
        """The start-time limiter's logs of ``keys`` as PostgreSQL holds them."""
        rates = self.adm.core.rates
        limits = {
            k: (lim.limit, lim.window_s) for k in keys if (lim := rates.limit_of(k)) is not None
        }
        if not limits:
            return
        store = await self.adm.ctx.store()

        async def load() -> dict[str, ratelog.KeyLog]:
            async with store.tx() as conn:
                return await ratelog.key_logs(conn, limits, now)

        for key, kl in (await retrying("rate log starts", load)).items():
            rates.starts.replace(key, StartLog.of(kl.recent, kl.older_floor, kl.older_resolved))

    async def controls(self) -> None:
        """Reload pauses and run-time limits, and re-queue jobs whose priority changed."""
        a = self.adm
        store = await a.ctx.store()
        ids = sorted(a.reprioritize)
        a.reprioritize.clear()
        a.controls_dirty = False

        async def load() -> tuple[set[str], list[Limit], list[QueuedRow]]:
            async with store.tx() as conn:
                paused, limits = await admstore.controls(conn)
                rows = await admstore.load_ready(conn, ids) if ids else []
                return paused, limits, rows

        paused, runtime, rows = await retrying("admission controls", load)
        a.core.paused = paused
        merged = {(x.scope, x.match): x for x in a.config_limits}
        merged.update({(x.scope, x.match): x for x in runtime})
        a.core.rates.set_limits(merged.values())
        for row in rows:
            a.core.reprioritize(row.id, a.queued(row).due)
