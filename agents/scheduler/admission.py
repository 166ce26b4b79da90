"""The admission stage: which ready job runs next, and when.

``jobs.ready`` is keyed (and explicitly partitioned) by tenant, so each tenant has one owner
in the scheduler group. The owner keeps its tenants' ready jobs in the admission core
(``agents.core.admission``: rate limits, priority, fair share, semaphores) and runs decision
rounds: on new jobs, on released capacity and operator controls (PostgreSQL ``NOTIFY`` from
whichever process changed them), when a rate limit expires, and at least every second while
jobs wait. A round snapshots the semaphores, asks the core, carries the admissions out in one
transaction (``agents.store.admission.admit``, which re-checks everything under locks), sends the
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
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

from agents.context import Context, RawMessage, retrying
from agents.core.admission import AdmissionCore, Decisions, Policy, QueuedJob, due_time
from agents.core.depth import UNITS, WorkEstimates, slot_units
from agents.core.ratelimit import Limit
from agents.core.semaphores import SLOTS, needs_for
from agents.deadletter import dead_letter, decode_all
from agents.errors import StoreUnavailable
from agents.scheduler.admission_metrics import AdmissionMetrics
from agents.scheduler.admission_sync import Sync, start_waits
from agents.scheduler.dispatching import Dispatcher
from agents.scheduler.held import Held
from agents.store import admission as admstore
from agents.store.admission import AdmitResult, Candidate, CyclePlan
from agents.store.rows import QueuedRow, ReadyJob
from streams.events import JobReady
from streams.kafka import partition_for

log = logging.getLogger("jobstream.admission")
IDLE_POLL_S = 1.0


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
        # seeded from PostgreSQL at start
        self.work = WorkEstimates(s.inflight_horizon_s, most=slot_units(s.capacity_factor))
        self.partitions = ctx.registry["jobs.ready"].partitions
        self.wake = asyncio.Event()
        self.owned: set[int] | None = None
        self.next_resync = 0.0
        self.sync = Sync(self)
        self.wake_at: float | None = None
        self.controls_dirty = True
        self.reprioritize: set[str] = set()
        self.gates_written: dict[str, str] = {}
        self.rounds = 0
        self.admitted = 0
        # jobs not admitted before ``run_after`` (a retry's backoff, a submission's
        # ``run_at``), not in the core until then
        self.held = Held()
        self.gate_after_commit: set[str] = set()  # held by a cycle not committed yet
        self.report = AdmissionMetrics(ctx.metrics)
        self.dispatcher = Dispatcher(ctx)
        self.origin = uuid.uuid4().hex[:12]  # this process's releases (``CyclePlanner``)
        # jobs taken without the topic since ownership was last confirmed unchanged: if it
        # changed meanwhile, they are published after all (their new owner may have loaded
        # the tenant's ready jobs before they were committed)
        self.taken_locally: dict[str, ReadyJob] = {}
        # rate-limit keys whose next admission waits for a start, and when to read them again
        self.start_waits: set[str] = set()
        self.starts_read_at = 0.0

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

    def starts_reported(self, starts: Sequence[tuple[str, float]]) -> None:
        """Starts of admitted jobs (job id, when): what rate limits held at the start wait
        for (``agents.core.startlimit``); a key that waited may admit again."""
        limiter = self.core.rates.starts
        for job_id, at in starts:
            limiter.started(job_id, at)
        if starts and self.start_waits:
            self.wake.set()

    def observe_work(self, durations: Sequence[tuple[str, float]]) -> None:
        """Successes' run times (kind, seconds): a kind whose expected work changed takes
        its new share of a slot, queued jobs included (``agents.core.depth``)."""
        for kind in self.work.observe(durations):
            if self.core.recost(kind, SLOTS, self.work.units(kind)):
                self.wake.set()

    def enqueue(self, rows: Sequence[QueuedRow], now: float, *, committed: bool = True) -> int:
        """Queue rows in the core, or hold them until ``run_after`` (``agents.scheduler.held``).
        ``committed`` False: the rows' transaction is not committed yet, so their gate (a
        write a concurrent round could make before the rows exist) waits for ``carry_out``."""
        added = 0
        held = self.held
        for r in rows:
            if r.run_after is not None and r.run_after > now:
                if r.id in self.core.jobs:
                    continue
                new = r.id not in held
                if not committed:
                    self.gate_after_commit.add(r.id)
                if held.hold(r, gate=committed):
                    added += new
                    if self.wake_at is None or r.run_after < self.wake_at:
                        self.wake_at = r.run_after
                        self.wake.set()  # the rounds' loop looks again when to wake
            elif r.id not in held:
                added += self.core.enqueue(self.queued(r))
        return added

    def _release_delayed(self, now: float, d: Decisions | None = None) -> float | None:
        """Move held rows whose ``run_after`` came into the core; gate the others (once);
        the next ``run_after``."""
        for row in self.held.due(now):
            if self.owns(row.tenant):
                self.core.enqueue(self.queued(row))
        if d is not None and self.held.ungated:
            d.gates.update(self.held.new_gates())
        return self.held.next_at()

    def forget_gates(self) -> None:
        """The gates written are no longer known (ownership changed): write them again."""
        self.gates_written.clear()
        self.held.regate()

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
        mine, rest = self._split_local(jobs)
        if not mine:
            return rest
        rows = [r for j in mine if (r := j.queued_row()) is not None]
        unread = [j.id for j in mine if j.ready_at is None]  # e.g. retries: read them
        if unread:
            rows += await self._load_ready(unread)
        self.enqueue(rows, time.time())
        self.wake.set()
        self.taken_locally.update((j.id, j) for j in mine)
        return rest

    def _split_local(self, jobs: Sequence[ReadyJob]) -> tuple[list[ReadyJob], list[ReadyJob]]:
        """(the jobs of tenants this process owns now, the others): none are its own while
        its assignment is unknown or changed since the last round took it in."""
        assigned = self.assigned()
        if not assigned or assigned != self.owned:
            return [], list(jobs)
        mine: list[ReadyJob] = []
        rest: list[ReadyJob] = []
        for j in jobs:
            (
                mine if partition_for(j.tenant.encode(), self.partitions) in assigned else rest
            ).append(j)
        return mine, rest

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
        s = self.ctx.settings
        self.work = WorkEstimates(s.inflight_horizon_s, seed, slot_units(s.capacity_factor))
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
            await self.dispatcher.drain(5.0)

    async def _listen(self) -> None:
        """Wake on ``NOTIFY jobstream`` (capacity released, controls changed) from any process."""
        store = await self.ctx.store()
        while True:
            try:
                async with store.notifications(admstore.CHANNEL) as payloads:
                    self.controls_dirty = True  # anything missed while not listening
                    self.wake.set()
                    own = admstore.release_payload(self.origin)
                    async for payload in payloads:
                        if payload == own:
                            continue  # a cycle of this process admitted into it already
                        if payload == "control":
                            self.controls_dirty = True
                        elif payload.startswith("priority "):
                            self.reprioritize.add(payload.split(" ", 1)[1])
                        self.wake.set()
            except asyncio.CancelledError:
                raise
            except (StoreUnavailable, OSError) as exc:
                log.warning("admission: LISTEN connection lost (%s); reconnecting", exc)
                await asyncio.sleep(1.0)

    async def round(self) -> bool:
        """One decision round; True when something was dispatched."""
        store = await self.ctx.store()
        self.rounds += 1
        now = time.time()
        await self.sync.ownership(now)
        if self.controls_dirty or self.reprioritize:
            await self.sync.controls()
        await self.sync.starts(now)
        next_delayed = self._release_delayed(now)
        if not len(self.core):
            self.wake_at = next_delayed
            if self.held:
                await self._write_gates(self._delayed_gates(now))
            return False
        self.ctx.tracer.mark("round")
        async with store.autocommit() as conn:
            snap = await admstore.semaphore_snapshot(conn)
        self.ctx.tracer.mark("snapshot")
        now = time.time()
        d, free_slots = self._decide(snap, now)
        next_delayed = self._release_delayed(now, d)
        read_again = self.starts_read_at if self.start_waits else None
        self.wake_at = min(
            (t for t in (d.wake_at, next_delayed, read_again) if t is not None), default=None
        )
        dispatched = await self._carry_out(d, now, free_slots) if d.admitted else 0
        await self._write_gates(d)
        self.report.record(self.core, len(self.held), d, now)
        return dispatched > 0

    def _delayed_gates(self, now: float) -> Decisions:
        d = Decisions()
        self._release_delayed(now, d)
        return d

    def _decide(
        self, semaphores: Mapping[str, tuple[int, int]], now: float
    ) -> tuple[Decisions, int]:
        """The core's decision for the semaphores' ``(capacity, used)``, and the free slots
        it saw (whole slots: a slot is ``UNITS`` units)."""
        sem = self.core.sem
        sem.capacity = {name: cap for name, (cap, _) in semaphores.items()}
        sem.used = {name: used for name, (_, used) in semaphores.items()}
        free = sem.capacity.get(SLOTS, 0) - sem.used.get(SLOTS, 0)
        d = self.core.decide(now, max_admits=self.ctx.settings.admission_batch)
        self.start_waits = start_waits(d)
        return d, max(0, free // UNITS)

    def _candidates(self, d: Decisions) -> list[Candidate]:
        rates = self.core.rates
        return [
            Candidate(a.job.id, a.holds, rates.keys(a.job.tenant, a.job.kind)) for a in d.admitted
        ]

    async def _carry_out(self, d: Decisions, now: float, free_slots: int) -> int:
        store = await self.ctx.store()
        candidates = self._candidates(d)

        async def tx() -> AdmitResult:
            async with store.pipelined() as conn:
                async with conn.transaction():
                    pending = await admstore.admit(conn, candidates, now)
                return await pending.result()  # COMMIT went out with the writes

        res = await retrying("admission transaction", tx)
        return await self._admitted(d, candidates, res, now, free_slots)

    async def _admitted(
        self,
        d: Decisions,
        candidates: Sequence[Candidate],
        res: AdmitResult,
        now: float,
        free_slots: int,
    ) -> int:
        """After an admission transaction: refused jobs back to the queue (their gate
        noted), the dispatched ones sent."""
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
            await self.sync.reload_rate_log(sorted(stale_keys), now)
        if res.dispatched:
            due = {c.id: (c, by_id[c.id].job.due) for c in candidates}
            await self.dispatcher.dispatch(res.dispatched, res.send, due, now, free_slots)
        for x in res.dispatched:
            self.gates_written.pop(x.job.id, None)
        self.admitted += len(res.dispatched)
        return len(res.dispatched)

    # -- in a hot cycle's transaction (``CyclePlanner``) ------------------------------------

    def plan(
        self, ready: Sequence[ReadyJob], semaphores: Mapping[str, tuple[int, int]], now: float
    ) -> CyclePlan:
        """Queue the ready jobs of the tenants owned here (as ``take_local``) and decide for
        the capacity the cycle's transaction holds locked; the rest are for ``jobs.ready``."""
        mine, forward = self._split_local(ready)
        rows = [r for j in mine if (r := j.queued_row()) is not None]
        forward += [j for j in mine if j.ready_at is None]  # not read as queued: the topic
        self.enqueue(rows, now, committed=False)
        self.taken_locally.update((j.id, j) for j in mine if j.ready_at is not None)
        if mine:
            self.ctx.metrics.count("ready_handoffs", {"path": "local"}, n=len(rows))
        self._release_delayed(now)
        if not len(self.core):
            return CyclePlan([], forward)
        d, free_slots = self._decide(semaphores, now)
        self._release_delayed(now, d)
        if self.start_waits or (
            d.wake_at is not None and (self.wake_at is None or d.wake_at < self.wake_at)
        ):
            self.wake.set()  # the round recomputes when to look again
        return CyclePlan(self._candidates(d), forward, (d, free_slots, now))

    def abandon(self, plan: CyclePlan) -> None:
        if plan.note is not None:
            for a in plan.note[0].admitted:
                self.core.enqueue(a.job)
        self._gate_committed()

    def _gate_committed(self) -> None:
        """The rows held inside a cycle exist (or its replay will hold them again): their
        gates may be written now, by the next round."""
        if self.gate_after_commit:
            self.held.regate(self.gate_after_commit)
            self.gate_after_commit.clear()
            self.wake.set()

    async def carry_out(self, plan: CyclePlan, res: AdmitResult | None) -> None:
        """After the cycle's COMMIT: send what it dispatched, note the gates."""
        self._gate_committed()
        if plan.note is None:
            return
        d, free_slots, now = plan.note
        if res is not None and self.ctx.tracer.on:  # ready and admitted by one commit
            self.ctx.tracer.mark("ready", *(x.job.id for x in res.dispatched))
        admitted = await self._admitted(
            d, plan.candidates, res or AdmitResult([], {}), now, free_slots
        )
        if admitted >= self.ctx.settings.admission_batch:
            self.wake.set()  # as many as one decision takes: more may fit
        await self._write_gates(d)
        self.report.record(self.core, len(self.held), d, now)

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

        async def tx() -> set[str]:
            async with store.tx() as conn:
                return await admstore.write_gates(conn, changed)

        took = await retrying("admission gates", tx)
        for job_id, _, _ in changed:  # not ready (any more, or yet): written when next given
            if job_id not in took:
                self.gates_written.pop(job_id, None)
