"""Sending what admission decided: dispatch commands, ``admission.decision`` records, and the
broker's confirmation of each dispatch recorded in PostgreSQL.

Invariants:
- A job is already ``dispatched`` in PostgreSQL when its dispatch is sent: if this process
  dies first, the reconciler re-sends what was never confirmed (``resend_unconfirmed``), and
  workers fence by attempt.
- Sends go out in the order they were decided, at most ``SENDS_IN_FLIGHT`` behind the
  decisions, so the next decision is made while the broker acknowledges the last.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping, Sequence

from agents.context import Context, retrying
from agents.core.semaphores import ALL, GLOBAL, SLOTS
from agents.store.admission import Candidate, Dispatched
from agents.store.rows import DispatchJob
from streams.events import AdmissionDecision, Dispatch, encode
from streams.kafka import Record

log = logging.getLogger("jobstream.admission")
SENDS_IN_FLIGHT = 4  # decisions whose dispatches may wait for the broker behind the next one


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
                    not_before=j.not_before,
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
    await retrying("dispatch produce", lambda: ctx.dispatch_producer.aproduce(records))
    await retrying("dispatch confirm", lambda: store.confirm_dispatch(rows))
    return len(rows)


class Dispatcher:
    """Sends the dispatches and decisions of each admission, in order, behind it."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.sending: list[asyncio.Future[None]] = []  # sends, oldest first

    async def dispatch(
        self,
        dispatched: Sequence[Dispatched],
        send: int | None,
        candidates: Mapping[str, tuple[Candidate, float]],
        now: float,
        free_slots: int,
    ) -> None:
        """Send the jobs an admission transaction dispatched: each one's dispatch command
        and its ``admission.decision`` (``candidates``: what each was admitted with, and its
        due time)."""
        ctx = self.ctx
        jobs = [x.job for x in dispatched]
        shared = {j.id for j in jobs if holds_shared(candidates[j.id][0].holds)}
        records = await dispatch_records(
            ctx, jobs, {j.id: candidates[j.id][1] for j in jobs}, shared
        )
        topic = ctx.topic("scheduler.decisions")
        for job, priority, size, ready_at in dispatched:
            cand, due = candidates[job.id]
            decision = AdmissionDecision(
                job_id=job.id,
                attempt=job.attempt,
                tenant=job.tenant,
                kind=job.kind,
                at=now,
                priority=priority,
                size=size,
                due=due,
                waited_s=max(0.0, now - ready_at),
                holds=dict(cand.holds),
                rate_keys=[k for k, _, _ in cand.rate_keys],
                free_slots=free_slots,
            )
            records.append(Record(topic, encode(decision), job.tenant.encode()))
            tags = {"tenant": job.tenant, "kind": job.kind}
            ctx.metrics.count("admissions", tags)
            ctx.metrics.observe("admission_wait_ms", decision.waited_s * 1000, tags)
        await self._send(records, jobs, send)

    async def _send(self, records: list[Record], jobs: list[DispatchJob], send: int | None) -> None:
        """Produce the records, then confirm the send, behind the caller (one send after
        another, at most ``SENDS_IN_FLIGHT``)."""
        store = await self.ctx.store()
        previous = self.sending[-1] if self.sending else None

        async def produce() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            tracer = self.ctx.tracer
            if tracer.on:
                tracer.mark("send", *(j.id for j in jobs))
            if self.ctx.dispatch_producer is self.ctx.producer:
                await retrying("dispatch produce", lambda: self.ctx.producer.aproduce(records))
            else:  # share groups: dispatches one batch each (``Context.dispatch_producer``)
                head, tail = records[: len(jobs)], records[len(jobs) :]
                await retrying(
                    "dispatch produce",
                    lambda: asyncio.gather(
                        self.ctx.dispatch_producer.aproduce(head),
                        self.ctx.producer.aproduce(tail),
                    ),
                )
            if tracer.on:
                tracer.mark("produced", *(j.id for j in jobs))
            if send is not None:
                await retrying("dispatch confirm", lambda: store.confirm_send(send))

        task = asyncio.ensure_future(produce())
        self.sending.append(task)
        task.add_done_callback(self._sent)
        while len(self.sending) > SENDS_IN_FLIGHT:
            await asyncio.wait([self.sending[0]])

    def _sent(self, task: asyncio.Future[None]) -> None:
        self.sending.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "admission: sending dispatches failed (the reconciler re-sends them): %r",
                task.exception(),
            )

    async def drain(self, timeout_s: float) -> None:
        """Stopping: let the last sends finish (briefly)."""
        if self.sending:
            await asyncio.wait(self.sending, timeout=timeout_s)
