"""The admission core: which ready job runs next, and when.

Inputs are queued jobs (tenant, kind, priority, size, what they need), the limits and the
current semaphore usage; ``decide(now)`` returns the jobs to admit, each with what it takes,
plus the gate of every job it looked at and could not admit, plus when to decide again.

**Rate limits** (sliding-window log). A limit of N admissions per window W applies to a key:
``tenant:T``, ``kind:K``, ``tenant_kind:T/K`` or ``global``. A job may be admitted at time x
only if fewer than N admissions of each of its keys lie in (x − W, x]; hence no half-open
window (s, s + W] ever holds more than N. The log of a key keeps its latest N admission times
only (older ones can never matter again): memory is O(N) per key. A denied job is told the time
it may next run (the N-th latest admission + W); it holds nothing meanwhile
(``agents.core.ratelimit``).

**Priority** (earliest virtual deadline first). Each job gets a *due* time when queued::

    due = queued_at + max_wait_s × (w × (20 − priority) / 40
                                    + (1 − w) × min(1, ln(1 + size) / ln(1 + size_ref)))

so priority 20 and size 0 are due at once and priority −20 with a size ≥ ``size_ref`` is due
``max_wait_s`` later. A tenant's jobs run in (due, id) order: higher priority and smaller
projects first, and aging is built in: a job that has waited ``max_wait_s`` is behind only jobs
that have waited at least as long. The job id breaks ties: the order is deterministic and
does not depend on the order jobs were queued in.

**Fair share** (deficit round robin). Tenants with queued jobs take turns; on its turn a tenant
gets ``quantum × weight`` admissions of credit. A tenant that becomes active joins the end of
the rotation, so its first job waits at most one turn of each other active tenant.

**Semaphores**. A job needs a set of (name, amount): ``slots`` (worker capacity, 1 each),
``kind:K`` when its kind has a concurrency maximum, named resources, and ``*`` (1 each, the
global scope). An exclusive job needs the whole capacity of its scope (a resource or ``*``). A
job is admitted only when every amount fits at once (all or nothing: no job ever holds part
of what it needs, so no deadlock), and usage never exceeds capacity. A job that is *due*
(its due time passed) and blocked on resources other than ``slots`` reserves them: no job
after it in the round may take them, so capacity drains towards it and it cannot starve
(``agents.core.semaphores``).

Pure: no I/O, no clock (``now`` is an argument), stdlib only.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from agents.core.ratelimit import Limit, RateLimiter
from agents.core.semaphores import ALL, SLOTS, Need, Semaphores, with_amount


@dataclass(frozen=True, slots=True)
class Policy:
    max_wait_s: float = 300.0
    priority_weight: float = 0.7
    size_ref: int = 1 << 30
    quantum: int = 1
    scan_limit: int = 32  # jobs looked at per tenant turn past blocked ones


# a rate-limit gate's words while the key's next admission waits for an earlier start
START_WAIT = "waiting for a start"


@dataclass(frozen=True, slots=True)
class Gate:
    """Why a job is not admitted now. ``until``: when it may next be admitted (rate limits)."""

    kind: Literal[
        "rate_limit",
        "semaphore",
        "reserved",
        "exclusive",
        "paused",
        "capacity",
        "backoff",
        "scheduled",
    ]
    detail: str
    until: float | None = None

    def text(self) -> str:
        return f"{self.kind}: {self.detail}"


class QueuedJob(NamedTuple):
    """A queued job, lean: it is the heap entry itself (80 bytes plus its id and due). It
    sorts by (due, id); ids are unique, so comparison never reaches the other fields."""

    due: float
    id: str
    tenant: str
    kind: str
    needs: tuple[Need, ...]


class Admit(NamedTuple):
    job: QueuedJob
    holds: tuple[Need, ...]  # what it takes, ALL resolved to the capacity
    rate_keys: tuple[str, ...]


@dataclass(slots=True)
class Decisions:
    admitted: list[Admit] = field(default_factory=list)
    gates: dict[str, Gate] = field(default_factory=dict)
    wake_at: float | None = None  # the earliest rate-limit expiry among denied jobs


def due_time(queued_at: float, priority: int, size: int, policy: Policy) -> float:
    p = (20 - max(-20, min(20, priority))) / 40
    s = min(1.0, math.log1p(max(0, size)) / math.log1p(policy.size_ref))
    w = policy.priority_weight
    return queued_at + policy.max_wait_s * (w * p + (1 - w) * s)


class AdmissionCore:
    """Queued jobs of the tenants this owner holds, and the decisions about them."""

    # False: every turn through ``_turn`` and every head scanned for reservations (the
    # reference the shortcuts are property-tested against)
    shortcuts = True

    def __init__(
        self,
        policy: Policy | None = None,
        limits: Iterable[Limit] = (),
        capacity: Mapping[str, int] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        self.policy = policy or Policy()
        self.rates = RateLimiter(limits)
        self.sem = Semaphores(capacity)
        self.weights: dict[str, float] = dict(weights or {})
        self.queues: dict[str, list[QueuedJob]] = {}
        self.jobs: dict[str, QueuedJob] = {}
        self.active: deque[str] = deque()
        self.deficit: dict[str, float] = {}
        self.paused: set[str] = set()  # "tenant:T", "kind:K", "job:ID"
        # every distinct need of jobs queued since the queue was last empty (a superset of
        # what is queued now), with slots left out: what could make a head reserve
        self.wanted_kinds: dict[tuple[Need, ...], list[Need]] = {}
        self.now = 0.0

    # -- the queue -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.jobs)

    def enqueue(self, job: QueuedJob) -> bool:
        """Queue a job (idempotent on id). Its ``due`` must already be set (``due_time``)."""
        if job.id in self.jobs:
            return False
        if not self.jobs:
            self.wanted_kinds.clear()
        if job.needs not in self.wanted_kinds:
            self.wanted_kinds[job.needs] = [n for n in job.needs if n[0] != SLOTS]
        self.jobs[job.id] = job
        q = self.queues.get(job.tenant)
        if q is None:
            q = self.queues[job.tenant] = []
            self.active.append(job.tenant)
            self.deficit[job.tenant] = 0.0
        heapq.heappush(q, job)
        return True

    def remove(self, job_id: str) -> QueuedJob | None:
        """Forget a queued job (cancelled, admitted elsewhere, tenant handed over)."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return None
        q = self.queues[job.tenant]
        q.remove(job)
        heapq.heapify(q)
        if not q:
            self._drop_tenant(job.tenant)
        return job

    def recost(self, kind: str, name: str, amount: int) -> int:
        """Give every queued job of ``kind`` ``amount`` of ``name`` (its expected work changed);
        order and turns are kept. Returns how many jobs changed."""
        changed = 0
        for q in self.queues.values():
            for i, job in enumerate(q):
                if job.kind != kind:
                    continue
                new = with_amount(job.needs, name, amount)
                if new is not job.needs:
                    if new not in self.wanted_kinds and job.needs in self.wanted_kinds:
                        self.wanted_kinds[new] = self.wanted_kinds[job.needs]
                    q[i] = self.jobs[job.id] = job._replace(needs=new)  # same (due, id)
                    changed += 1
        return changed

    def drop_tenants(self, keep: Iterable[str]) -> list[str]:
        """Forget every tenant not in ``keep`` (partitions revoked); return the job ids."""
        keep_set = set(keep)
        gone = []
        for tenant in [t for t in self.queues if t not in keep_set]:
            for job in self.queues[tenant]:
                del self.jobs[job.id]
                gone.append(job.id)
            self._drop_tenant(tenant)
        return gone

    def _drop_tenant(self, tenant: str) -> None:
        self.queues.pop(tenant, None)
        self.deficit.pop(tenant, None)
        try:
            self.active.remove(tenant)
        except ValueError:
            pass

    def reprioritize(self, job_id: str, due: float) -> bool:
        """Move a queued job to a new due time (``due_time`` with its new priority)."""
        job = self.remove(job_id)
        if job is None:
            return False
        self.enqueue(job._replace(due=due))
        return True

    # -- decisions -------------------------------------------------------------------------

    def decide(self, now: float, max_admits: int | None = None) -> Decisions:
        """Admit what may run now, in fair-share order; record gates of what may not."""
        now = self.now = max(self.now, now)
        out = Decisions()
        reserved = self._reservations(now, out)
        self._full: dict[str, Gate] = {}  # semaphores found full in this round
        budget = max_admits if max_admits is not None else len(self.jobs)
        idle_turns = 0
        active, deficits, weights = self.active, self.deficit, self.weights
        queues, jobs, quantum = self.queues, self.jobs, self.policy.quantum
        cap, used = self.sem.capacity, self.sem.used
        rates = self.rates
        has_limits = bool(rates.exact or rates.any)
        append = out.admitted.append
        # nothing paused or reserved: a turn worth one admission whose head fits is taken
        # here, inline (the common case; the same outcome as ``_turn`` for it)
        simple = self.shortcuts and not self.paused and not reserved
        room_needs: tuple[Need, ...] | None = None
        room = 0
        while budget > 0 and active and idle_turns < len(active):
            tenant = active[0]
            deficit = deficits[tenant]
            if deficit < 1:
                deficit += quantum * weights.get(tenant, 1.0)
            if simple and 1 <= deficit < 2:
                q = queues[tenant]
                job = q[0]
                keys: tuple[tuple[str, int, float], ...] = ()
                fits = True
                if has_limits:
                    keys = rates.keys(tenant, job.kind)
                    fits = not keys or rates.next_allowed(keys, now)[0] <= now
                needs = job.needs
                if fits and (needs is not room_needs or room < 1):
                    # how many more jobs with these needs fit (kept while only they admit;
                    # ~10 % of the core's time, measured)
                    room_needs, room = needs, budget
                    for name, amount in needs:
                        c = cap.get(name)
                        if amount == ALL or c is None:
                            room = 0
                            break
                        room = min(room, (c - used.get(name, 0)) // amount)
                    fits = room > 0
                if fits:
                    heapq.heappop(q)
                    if keys:
                        rates.record(keys, now, job.id)
                    for name, amount in needs:
                        used[name] = used.get(name, 0) + amount
                    room -= 1
                    del jobs[job.id]
                    deficits[tenant] = deficit - 1
                    append(_new_admit(Admit, (job, needs, rates.names(keys) if keys else ())))
                    budget -= 1
                    idle_turns = 0
                    if q:
                        active.rotate(-1)
                    else:
                        self._drop_tenant(tenant)
                    continue
            deficits[tenant] = deficit
            has_credit = deficit >= 1
            room_needs = None  # the general turn may change any usage
            admitted, exhausted, stop = self._turn(tenant, now, reserved, out, budget)
            budget -= admitted
            if admitted:
                idle_turns = 0
            elif has_credit:
                idle_turns += 1  # a turn without credit (weight < 1) is not idleness
            if stop:
                break
            if exhausted:
                if tenant not in queues:
                    continue  # dropped from the rotation (queue empty)
                deficits[tenant] = min(deficits[tenant], 1.0)
            active.rotate(-1)
        return out

    def _reservations(self, now: float, out: Decisions) -> dict[str, str]:
        """Resources (other than slots) reserved for due jobs that cannot start now: in due
        order, each blocked due head reserves what it wants unless an earlier one holds any
        of it. (Only blocked heads can reserve, and blocking does not depend on the order,
        so they are found first and only they are sorted.)"""
        blocking = self.sem.blocking
        # nothing can be blocked when no kind of need queued here is: skip the scan of every
        # tenant's head (10,000 tenants: most of a round's cost)
        wanted_of = self.wanted_kinds
        if self.shortcuts and all(blocking(wanted) is None for wanted in wanted_of.values()):
            return {}
        blocked = []
        for q in self.queues.values():
            job = q[0]
            if job.due <= now:
                wanted = wanted_of[job.needs]
                if blocking(wanted) is not None:
                    blocked.append((job, wanted))
        reserved: dict[str, str] = {}
        if not blocked:
            return reserved
        blocked.sort(key=lambda pair: pair[0])
        for job, wanted in blocked:
            if any(name in reserved for name, _ in wanted):
                continue
            for name, _ in wanted:
                reserved[name] = job.id
        return reserved

    def _turn(
        self,
        tenant: str,
        now: float,
        reserved: dict[str, str],
        out: Decisions,
        budget: int,
    ) -> tuple[int, bool, bool]:
        """One tenant's turn: (admitted, tenant has nothing more it may run now, stop round)."""
        q = self.queues[tenant]
        stash: list[QueuedJob] = []
        admitted = 0
        stop = False
        looked = 0
        sem = self.sem
        cap, used = sem.capacity, sem.used
        rates = self.rates
        has_limits = bool(rates.exact or rates.any)
        paused = self.paused
        deficit = self.deficit[tenant]
        gates = out.gates
        append = out.admitted.append
        full = self._full
        while q and deficit >= 1 and admitted < budget:
            job = q[0]
            needs = job.needs
            keys: tuple[tuple[str, int, float], ...] = ()
            if has_limits:
                keys = rates.keys(tenant, job.kind)
            # fast path: not paused, within every limit, every need fits, nothing reserved
            fits = not paused or (
                f"job:{job.id}" not in paused
                and f"tenant:{tenant}" not in paused
                and f"kind:{job.kind}" not in paused
            )
            if fits and keys:
                fits = rates.next_allowed(keys, now)[0] <= now
            gate: Gate | None = None
            if fits:
                for name, amount in needs:
                    c = cap.get(name)
                    if (
                        c is None
                        or used.get(name, 0) + (c if amount == ALL else amount) > c
                        or (name in reserved and reserved[name] != job.id)
                    ):
                        fits = False
                        if amount != ALL:  # usage only grows within a round: still full
                            gate = full.get(name)
                        break
            if fits:
                heapq.heappop(q)
                if keys:
                    rates.record(keys, now, job.id)
                exclusive = _HAS_ALL.get(needs)
                if exclusive is None:
                    exclusive = _HAS_ALL[needs] = any(a == ALL for _, a in needs)
                holds = sem.resolve(needs) if exclusive else needs
                for name, amount in holds:
                    used[name] = used.get(name, 0) + amount
                del self.jobs[job.id]
                deficit -= 1
                admitted += 1
                append(Admit(job, holds, rates.names(keys) if keys else ()))
                continue
            if gate is None:
                gate = self._gate(job, now, reserved)
                if gate is None:  # pragma: no cover - the fast path and _gate agree
                    raise AssertionError(f"job {job.id} neither fits nor has a gate")
                if gate.kind == "semaphore":
                    full[gate.detail.split(" ", 1)[0]] = gate
            gates[job.id] = gate
            if gate.until is not None:
                out.wake_at = gate.until if out.wake_at is None else min(out.wake_at, gate.until)
            if gate.kind == "capacity":
                stop = True  # no slots left for anyone this round
                break
            if gate.detail.startswith(("tenant:", "global")):
                break  # the whole tenant (or everyone) waits; nothing behind can pass
            stash.append(heapq.heappop(q))
            looked += 1
            if looked >= self.policy.scan_limit:
                break
        self.deficit[tenant] = deficit
        exhausted = not q or deficit >= 1 or bool(looked)
        for entry in stash:
            heapq.heappush(q, entry)
        if not q:
            self._drop_tenant(tenant)
        return admitted, exhausted, stop

    def _gate(self, job: QueuedJob, now: float, reserved: Mapping[str, str]) -> Gate | None:
        """Why ``job`` cannot be admitted now (the first reason, in this order), or None."""
        paused = self.paused
        if paused:
            for scope in (f"job:{job.id}", f"tenant:{job.tenant}", f"kind:{job.kind}"):
                if scope in paused:
                    return Gate("paused", scope)
        keys = self.rates.keys(job.tenant, job.kind)
        if keys:
            until, key = self.rates.next_allowed(keys, now)
            if until > now:
                lim = next(k for k in keys if k[0] == key)
                if until == math.inf:  # held at the start: the next start is not known yet
                    return Gate("rate_limit", f"{key} {lim[1]}/{lim[2]:g}s: {START_WAIT}")
                return Gate("rate_limit", f"{key} {lim[1]}/{lim[2]:g}s", until)
        name = self.sem.blocking(job.needs)
        if name == SLOTS:
            return Gate("capacity", "no free worker slot")
        if name is not None:
            cap = self.sem.capacity.get(name)
            if cap is None:
                return Gate("semaphore", f"{name}: no such resource configured")
            used = self.sem.used.get(name, 0)
            amount = dict(job.needs)[name]
            if amount == ALL:
                return Gate("exclusive", f"{name}: {used}/{cap} in use, needs all of it")
            return Gate("semaphore", f"{name} {used}/{cap} in use, needs {amount}")
        for name, _ in job.needs:
            holder = reserved.get(name)
            if holder is not None and holder != job.id:
                return Gate("reserved", f"{name} reserved for the older job {holder}")
        return None


_HAS_ALL: dict[tuple[Need, ...], bool] = {}
_new_admit = tuple.__new__  # Admit without NamedTuple's Python-level __new__ (hot path)
