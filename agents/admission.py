"""The admission stage: which ready job runs next, and when.

``jobs.ready`` is keyed (and explicitly partitioned) by tenant, so each tenant has one owner
in the scheduler group. The owner keeps its tenants' ready jobs in the admission core
(``agents.core.admission``: rate limits, priority, fair share, semaphores) and runs decision
rounds: on new jobs, on released capacity and operator controls (PostgreSQL ``NOTIFY`` from
whichever process changed them), when a rate limit expires, and at least every second while
jobs wait. A round snapshots the semaphores, asks the core, carries the admissions out in one
transaction (``agents.admstore.admit``, which re-checks everything under locks), sends the
dispatches and one ``admission.decision`` each to ``scheduler.decisions``, and stores the gate
of every job it looked at and could not admit (``jobstream why``).

Invariants:
- Backlog lives in PostgreSQL: the core is rebuilt from ``state = 'ready'`` rows when the
  partitions this process owns change, and re-synchronised every ``admission_resync_s``.
- A job is dispatched only from ``ready`` (guarded), with a new attempt number; the dispatch
  is marked confirmed only after the broker acknowledged it; the reconciler re-sends
  dispatches left unconfirmed by a crash.
- Malformed messages on ``jobs.ready`` are dead-lettered, never fatal.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial

import psycopg
from psycopg import sql

from agents import admstore
from agents.admstore import Candidate
from agents.context import Context, RawMessage, retrying
from agents.core.admission import (
    ALL,
    GLOBAL,
    SLOTS,
    AdmissionCore,
    Decisions,
    Gate,
    Limit,
    Policy,
    QueuedJob,
    due_time,
    needs_for,
)
from agents.core.depth import UNITS, WorkEstimates
from agents.deadletter import dead_letter, decode_all
from agents.intake import ready_records
from agents.rows import DispatchJob, QueuedRow, ReadyJob
from streams.events import AdmissionDecision, Dispatch, JobReady, encode
from streams.kafka import Record, partition_for

log = logging.getLogger("jobstream.admission")
IDLE_POLL_S = 1.0
SENDS_IN_FLIGHT = 4  # rounds whose dispatches may wait for the broker behind the next round
CONFIRM_RETRIES_S = (0.01, 0.05, 0.2)  # a skipped confirmation again after these, then waits


async def dispatch_records(
    ctx: Context,
    jobs: Sequence[DispatchJob],
    due: Mapping[str, float] | None = None,
    shared: Collection[str] | None = None,
) -> list[Record]:
    """Dispatch commands, each to its kind's pool topic (created on first use); ``due``:
    admission's due time per job, so workers start urgent buffered work first; ``shared``:
    the jobs that hold a shared resource (None: assume every one does)."""
    await ctx.ensure_pools({j.kind for j in jobs})
    return [
        Record(
            ctx.dispatch_topic(j.kind),
            encode(
                Dispatch(
                    job_id=j.id,
                    attempt=j.attempt,
                    tenant=j.tenant,
                    kind=j.kind,
                    args=j.args,
                    timeout_s=j.timeout_s,
                    submitted_at=j.submitted_at,
                    dispatched_at=j.dispatched_at,
                    group=j.group,
                    due=(due or {}).get(j.id),
                    shared=shared is None or j.id in shared,
                )
            ),
            j.id.encode(),
            partition=ctx.dispatch_partition(j.id),
        )
        for j in jobs
    ]


def holds_shared(holds: Sequence[tuple[str, int]]) -> bool:
    """Whether an admission takes more than its slot and its share of the global scope: a
    named resource, a kind's limit, or all of a scope (exclusive)."""
    return any(n not in (SLOTS, GLOBAL) or a == ALL for n, a in holds)


async def resend_unconfirmed(ctx: Context, ids: Sequence[str]) -> int:
    """Send again dispatches whose broker confirmation was never recorded (a crash)."""
    store = await ctx.store()
    rows = await retrying("unconfirmed rows", lambda: store.unconfirmed_rows(ids))
    records = await dispatch_records(ctx, rows)
    await retrying("dispatch produce", lambda: ctx.producer.aproduce(records))
    await retrying("dispatch confirm", lambda: store.confirm_dispatch(rows, wait=True))
    return len(rows)


def semaphore_capacities(ctx: Context) -> dict[str, int]:
    s = ctx.settings
    caps = dict(s.resources)
    for name, kind in s.kinds.items():
        if kind.max_concurrency is not None:
            caps[f"kind:{name}"] = kind.max_concurrency
    return caps


class Admission:
    """One process's admission owner: the core, its rounds, and its view of ownership."""

    def __init__(self, ctx: Context, assigned: Callable[[], set[int] | None]) -> None:
        s = ctx.settings
        self.ctx = ctx
        self.assigned = assigned  # jobs.ready partitions this process owns (None: unknown)
        self.policy = Policy(
            max_wait_s=s.max_wait_s, priority_weight=s.priority_weight, size_ref=s.size_ref
        )
        self.config_limits = [Limit(x.scope, x.limit, x.window_s, x.match) for x in s.rate_limits]
        self.core = AdmissionCore(self.policy, self.config_limits, {}, s.tenant_weights)
        self.work = WorkEstimates(s.inflight_horizon_s)  # seeded from PostgreSQL at start
        self.partitions = ctx.registry["jobs.ready"].partitions
        self.wake = asyncio.Event()
        self.owned: set[int] | None = None
        self.next_resync = 0.0
        self.wake_at: float | None = None
        self.controls_dirty = True
        self.reprioritize: set[str] = set()
        self.gates_written: dict[str, str] = {}
        self.rounds = 0
        self.admitted = 0
        # retried jobs waiting out their backoff: (run_after, id, row), not in the core yet
        self.delayed: list[tuple[float, str, QueuedRow]] = []
        self.delayed_ids: set[str] = set()
        self._depth_at = 0.0
        self.sending: list[asyncio.Future[None]] = []  # rounds' sends, oldest first
        self.confirming: set[asyncio.Future[None]] = set()  # confirmations tried again
        # jobs taken without the topic since ownership was last confirmed unchanged: if it
        # changed meanwhile, they are published after all (their new owner may have loaded
        # the tenant's ready jobs before they were committed)
        self.taken_locally: dict[str, ReadyJob] = {}
        self._depth_seen: set[tuple[str, str]] = set()

    # -- inputs ----------------------------------------------------------------------------

    def queued(self, row: QueuedRow) -> QueuedJob:
        kind = self.ctx.settings.kinds.get(row.kind)
        resources = sorted({*(kind.resources if kind else ()), *row.resources})
        exclusive = row.exclusive or (kind.exclusive if kind else None)
        limited = kind is not None and kind.max_concurrency is not None
        return QueuedJob(
            due_time(row.ready_at, row.priority, row.size, self.policy),
            row.id,
            row.tenant,
            row.kind,
            needs_for(row.kind, resources, exclusive, limited, self.work.units(row.kind)),
        )

    def capacity_freed(self) -> None:
        self.wake.set()

    def observe_work(self, durations: Sequence[tuple[str, float]]) -> None:
        """Successes' run times (kind, seconds): a kind whose expected work changed takes
        its new share of a slot, queued jobs included (``agents.core.depth``)."""
        for kind in self.work.observe(durations):
            if self.core.recost(kind, SLOTS, self.work.units(kind)):
                self.wake.set()

    def enqueue(self, rows: Sequence[QueuedRow], now: float) -> int:
        """Queue rows in the core, or hold them until their backoff ends (``run_after``)."""
        added = 0
        for r in rows:
            if r.run_after is not None and r.run_after > now:
                if r.id not in self.delayed_ids and r.id not in self.core.jobs:
                    heapq.heappush(self.delayed, (r.run_after, r.id, r))
                    self.delayed_ids.add(r.id)
                    added += 1
            elif r.id not in self.delayed_ids:
                added += self.core.enqueue(self.queued(r))
        return added

    def _release_delayed(self, now: float, d: Decisions | None = None) -> float | None:
        """Move rows whose backoff ended into the core; gate the rest; the next end."""
        while self.delayed and self.delayed[0][0] <= now:
            _, job_id, row = heapq.heappop(self.delayed)
            self.delayed_ids.discard(job_id)
            if self.owns(row.tenant):
                self.core.enqueue(self.queued(row))
        if d is not None:
            for until, job_id, _ in self.delayed:
                d.gates[job_id] = Gate("backoff", f"retry after {until - now:.1f} s", until)
        return self.delayed[0][0] if self.delayed else None

    async def handle_ready(self, ctx: Context, messages: Sequence[RawMessage]) -> int:
        """``jobs.ready`` batch: queue the jobs that are still ready, wake the rounds."""
        ready, rejected = decode_all(ctx, messages, JobReady)
        await dead_letter(ctx, rejected)
        ids = list(dict.fromkeys(ev.job_id for ev in ready))
        if not ids:
            return 0
        added = self.enqueue(await self._load_ready(ids), time.time())
        self.wake.set()
        return added

    async def take_local(self, jobs: Sequence[ReadyJob]) -> list[ReadyJob]:
        """Queue here, without the ``jobs.ready`` hop, the ready jobs of tenants this
        process owns now (its assignment known and unchanged since the last round took it
        in); return the others, for the topic. A job taken here just before a rebalance is
        dropped by the next round with the rest of the tenant, and its new owner loads it
        from PostgreSQL, as it loads every ready job of the tenants it is given."""
        assigned = self.assigned()
        if not assigned or assigned != self.owned:
            return list(jobs)
        mine = [j for j in jobs if partition_for(j.tenant.encode(), self.partitions) in assigned]
        if not mine:
            return list(jobs)
        rows = [r for j in mine if (r := j.queued_row()) is not None]
        unread = [j.id for j in mine if j.ready_at is None]  # e.g. retries: read them
        if unread:
            rows += await self._load_ready(unread)
        self.enqueue(rows, time.time())
        self.wake.set()
        self.taken_locally.update((j.id, j) for j in mine)
        taken = {j.id for j in mine}
        return [j for j in jobs if j.id not in taken]

    async def _load_ready(self, ids: Sequence[str]) -> list[QueuedRow]:
        """The rows of these jobs that are still ready."""
        store = await self.ctx.store()

        async def load() -> list[QueuedRow]:
            async with store.tx() as conn:
                return await admstore.load_ready(conn, ids)

        return await retrying("admission load", load)

    def owns(self, tenant: str) -> bool:
        return self.owned is None or partition_for(tenant.encode(), self.partitions) in self.owned

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        store = await self.ctx.store()

        async def setup() -> None:
            async with store.tx() as conn:
                await admstore.ensure_semaphores(conn, semaphore_capacities(self.ctx))

        await retrying("admission setup", setup)
        seed = await retrying("admission durations", store.recent_durations)
        self.work = WorkEstimates(self.ctx.settings.inflight_horizon_s, seed)
        for kind in seed:  # jobs queued before the seed took a whole slot
            self.core.recost(kind, SLOTS, self.work.units(kind))
        listener = asyncio.create_task(self._listen())
        try:
            while True:
                timeout = IDLE_POLL_S
                if self.wake_at is not None:
                    timeout = max(0.0, min(timeout, self.wake_at - time.time()))
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout)
                except TimeoutError:
                    pass
                self.wake.clear()
                try:
                    if await self.round():
                        self.wake.set()  # admitted some: more may fit
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("admission round failed; retrying")
                    await asyncio.sleep(0.5)
        finally:
            listener.cancel()
            if self.sending or self.confirming:  # stopping: let the last sends finish (briefly)
                await asyncio.wait([*self.sending, *self.confirming], timeout=5.0)

    async def _listen(self) -> None:
        """Wake on ``NOTIFY jobstream`` (capacity released, controls changed) from any process."""
        dsn = self.ctx.settings.require_database()
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
                async with conn:
                    await conn.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(admstore.CHANNEL))
                    )
                    self.controls_dirty = True  # anything missed while not listening
                    self.wake.set()
                    async for n in conn.notifies():
                        if n.payload == "control":
                            self.controls_dirty = True
                        elif n.payload.startswith("priority "):
                            self.reprioritize.add(n.payload.split(" ", 1)[1])
                        self.wake.set()
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                log.warning("admission: LISTEN connection lost (%s); reconnecting", exc)
                await asyncio.sleep(1.0)

    async def round(self) -> bool:
        """One decision round; True when something was dispatched."""
        store = await self.ctx.store()
        self.rounds += 1
        now = time.time()
        await self._sync_ownership(now)
        if self.controls_dirty or self.reprioritize:
            await self._load_controls()
        next_delayed = self._release_delayed(now)
        if not len(self.core):
            self.wake_at = next_delayed
            if self.delayed:
                await self._write_gates(self._delayed_gates(now))
            return False
        self.ctx.tracer.mark("round")
        async with store.autocommit() as conn:
            snap = await admstore.semaphore_snapshot(conn)
        self.ctx.tracer.mark("snapshot")
        sem = self.core.sem
        sem.capacity = {name: cap for name, (cap, _) in snap.items()}
        sem.used = {name: used for name, (_, used) in snap.items()}
        free = sem.capacity.get(SLOTS, 0) - sem.used.get(SLOTS, 0)
        free_slots = max(0, free // UNITS)  # in whole slots (a slot is UNITS units)
        now = time.time()
        d = self.core.decide(now, max_admits=self.ctx.settings.admission_batch)
        next_delayed = self._release_delayed(now, d)
        self.wake_at = min((t for t in (d.wake_at, next_delayed) if t is not None), default=None)
        dispatched = await self._carry_out(d, now, free_slots) if d.admitted else 0
        await self._write_gates(d)
        self._record_metrics(d, now)
        return dispatched > 0

    def _record_metrics(self, d: Decisions, now: float) -> None:
        """Denials by gate (every round), queue depth per tenant and kind (at most once a
        second: it walks the queues)."""
        m = self.ctx.metrics
        if not m.enabled:
            return
        by_gate: dict[str, int] = {}
        for gate in d.gates.values():
            by_gate[gate.kind] = by_gate.get(gate.kind, 0) + 1
        for name, n in by_gate.items():
            m.count("admission_denials", {"gate": name}, n=n)
        if now - self._depth_at < 1.0:
            return
        self._depth_at = now
        depth: dict[tuple[str, str], int] = {}
        for q in self.core.queues.values():
            for job in q:
                depth[(job.tenant, job.kind)] = depth.get((job.tenant, job.kind), 0) + 1
        for (tenant, kind), n in depth.items():
            m.gauge("queue_depth", {"tenant": tenant, "kind": kind}, ready=n)
        for tenant, kind in self._depth_seen - depth.keys():
            m.gauge("queue_depth", {"tenant": tenant, "kind": kind}, ready=0)
        self._depth_seen = set(depth)
        m.gauge("admission", queued=len(self.core), delayed=len(self.delayed))

    def _delayed_gates(self, now: float) -> Decisions:
        d = Decisions()
        self._release_delayed(now, d)
        return d

    async def _carry_out(self, d: Decisions, now: float, free_slots: int) -> int:
        store = await self.ctx.store()
        rates = self.core.rates
        candidates = [
            Candidate(a.job.id, a.holds, rates.keys(a.job.tenant, a.job.kind)) for a in d.admitted
        ]

        async def tx() -> admstore.AdmitResult:
            async with store.pipelined() as conn:
                async with conn.transaction():
                    pending = await admstore.admit(conn, candidates, now)
                return await pending.result()  # COMMIT went out with the writes

        res = await retrying("admission transaction", tx)
        if self.ctx.tracer.on:
            self.ctx.tracer.mark("admitted", *(x.job.id for x in res.dispatched))
        by_id = {a.job.id: a for a in d.admitted}
        stale_keys: set[str] = set()
        for job_id, gate in res.refused.items():
            adm = by_id[job_id]
            if self.owns(adm.job.tenant):
                self.core.enqueue(adm.job)
            d.gates[job_id] = gate
            stale_keys.update(adm.rate_keys)
        if stale_keys:
            await self._reload_rate_log(sorted(stale_keys), now)
        jobs = [x.job for x in res.dispatched]
        shared = {j.id for j in jobs if holds_shared(by_id[j.id].holds)}
        records = await dispatch_records(
            self.ctx, jobs, {j.id: by_id[j.id].job.due for j in jobs}, shared
        )
        topic = self.ctx.topic("scheduler.decisions")
        for job, priority, size, ready_at in res.dispatched:
            adm = by_id[job.id]
            decision = AdmissionDecision(
                job_id=job.id,
                attempt=job.attempt,
                tenant=job.tenant,
                kind=job.kind,
                at=now,
                priority=priority,
                size=size,
                due=adm.job.due,
                waited_s=max(0.0, now - ready_at),
                holds=dict(adm.holds),
                rate_keys=list(adm.rate_keys),
                free_slots=free_slots,
            )
            records.append(Record(topic, encode(decision), job.tenant.encode()))
            tags = {"tenant": job.tenant, "kind": job.kind}
            self.ctx.metrics.count("admissions", tags)
            self.ctx.metrics.observe("admission_wait_ms", decision.waited_s * 1000, tags)
        await self._send(records, jobs)
        for job in jobs:
            self.gates_written.pop(job.id, None)
        self.admitted += len(jobs)
        return len(jobs)

    async def _send(self, records: list[Record], jobs: list[DispatchJob]) -> None:
        """Produce a round's dispatches and decisions, then mark the dispatches confirmed,
        behind the round: the next round decides while these wait for the broker and
        PostgreSQL (one after another, in round order, at most ``SENDS_IN_FLIGHT``).
        The jobs are already ``dispatched`` in PostgreSQL: if this process dies first, the
        reconciler re-sends what was never confirmed, and workers fence by attempt."""
        store = await self.ctx.store()
        previous = self.sending[-1] if self.sending else None

        async def send() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            tracer = self.ctx.tracer
            if tracer.on:
                tracer.mark("send", *(j.id for j in jobs))
            await retrying("dispatch produce", lambda: self.ctx.producer.aproduce(records))
            if tracer.on:
                tracer.mark("produced", *(j.id for j in jobs))
            left = await retrying("dispatch confirm", lambda: store.confirm_dispatch(jobs))
            if left:  # rows a start was being recorded on: again shortly, off the chain
                self._confirm_later(left)

        task = asyncio.ensure_future(send())
        self.sending.append(task)
        task.add_done_callback(self._sent)
        while len(self.sending) > SENDS_IN_FLIGHT:
            await asyncio.wait([self.sending[0]])

    def _confirm_later(self, jobs: list[DispatchJob]) -> None:
        async def again() -> None:
            store = await self.ctx.store()
            left = jobs
            for delay in CONFIRM_RETRIES_S:
                await asyncio.sleep(delay)
                left = await retrying("dispatch confirm", partial(store.confirm_dispatch, left))
                if not left:
                    return
            await retrying("dispatch confirm", partial(store.confirm_dispatch, left, wait=True))

        task = asyncio.ensure_future(again())
        self.confirming.add(task)
        task.add_done_callback(self.confirming.discard)

    def _sent(self, task: asyncio.Future[None]) -> None:
        self.sending.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "admission: sending dispatches failed (the reconciler re-sends them): %r",
                task.exception(),
            )

    async def _write_gates(self, d: Decisions) -> None:
        changed = []
        for job_id, gate in d.gates.items():
            text = gate.text()
            if self.gates_written.get(job_id) != text:
                changed.append((job_id, text, gate.until))
                self.gates_written[job_id] = text
        if not changed:
            return
        store = await self.ctx.store()

        async def tx() -> None:
            async with store.tx() as conn:
                await admstore.write_gates(conn, changed)

        await retrying("admission gates", tx)

    # -- ownership, controls, window logs --------------------------------------------------

    async def _sync_ownership(self, now: float) -> None:
        assigned = self.assigned()
        if assigned is None:
            return
        changed = assigned != self.owned
        taken, self.taken_locally = self.taken_locally, {}
        if not changed and now < self.next_resync:
            return
        if changed:
            keep = [
                t
                for t in self.core.queues
                if partition_for(t.encode(), self.partitions) in assigned
            ]
            dropped = self.core.drop_tenants(keep)
            lost = [taken[i] for i in dropped if i in taken]
            if lost:
                await retrying(
                    "hand over", lambda: self.ctx.producer.aproduce(ready_records(self.ctx, lost))
                )
            if dropped or self.owned is not None:
                log.info(
                    "admission: partitions %s (was %s); handed over %d queued jobs",
                    sorted(assigned),
                    sorted(self.owned or ()),
                    len(dropped),
                )
            self.gates_written.clear()
            self.owned = set(assigned)
            await self._reload_rate_log(None, now)
        await self._resync(now)
        self.next_resync = now + self.ctx.settings.admission_resync_s

    async def _resync(self, now: float) -> None:
        """Queue every ready job of the tenants owned here (idempotent)."""
        store = await self.ctx.store()

        async def load() -> list[QueuedRow]:
            async with store.tx() as conn:
                tenants = [t for t in await admstore.ready_tenants(conn) if self.owns(t)]
                return await admstore.load_ready_of(conn, tenants)

        rows = await retrying("admission resync", load)
        added = self.enqueue(rows, now)
        if added:
            log.info("admission: queued %d ready jobs from PostgreSQL", added)

    async def _reload_rate_log(self, keys: Sequence[str] | None, now: float) -> None:
        """Rebuild window logs from the durable log: all of them (ownership changed) or the
        given keys (another process admitted against them)."""
        rates = self.core.rates
        horizon = rates.horizon()
        if not horizon:
            return
        store = await self.ctx.store()

        async def load() -> dict[str, list[float]]:
            async with store.tx() as conn:
                return await admstore.rate_log_since(conn, now - horizon, keys)

        logs = await retrying("rate log", load)
        for key in keys if keys is not None else list(logs):
            lim = rates.limit_of(key)
            if lim is not None:
                rates.load(key, logs.get(key, []), lim.limit)

    async def _load_controls(self) -> None:
        store = await self.ctx.store()
        ids = sorted(self.reprioritize)
        self.reprioritize.clear()
        self.controls_dirty = False

        async def load() -> tuple[set[str], list[Limit], list[QueuedRow]]:
            async with store.tx() as conn:
                paused, limits = await admstore.controls(conn)
                rows = await admstore.load_ready(conn, ids) if ids else []
                return paused, limits, rows

        paused, runtime, rows = await retrying("admission controls", load)
        self.core.paused = paused
        merged = {(x.scope, x.match): x for x in self.config_limits}
        merged.update({(x.scope, x.match): x for x in runtime})
        self.core.rates.set_limits(merged.values())
        for row in rows:
            self.core.reprioritize(row.id, self.queued(row).due)
