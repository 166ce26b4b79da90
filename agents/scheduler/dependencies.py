"""The dependency stage: submissions and lifecycle events of one hot cycle
(``agents.scheduler.cycle``).

``jobs.dependent`` and ``jobs.events`` are keyed by the dependency group and co-partitioned
(``topics.yaml``), so one owner sees a group's submissions and its completions, in order;
``jobs.independent`` joins them in the same cycle. Per cycle, one transaction persists new
jobs and lifecycle events, loads the affected part of the graph and lets the pure
core (``agents.core.deps``) decide: release, fail (transitively, naming the root cause) or wait
(the gate shown by ``jobstream why``). Released jobs and retries go to their tenant's
admission owner (``forward_ready``: in-process when it is this one, else ``jobs.ready``).

Invariants:
- Arrival order does not matter, and duplicated or reordered completions change nothing
  (guarded transitions; decisions are written only from ``waiting``).
- A submission that can never run (a cycle, a forbidden cross-tenant dependency) is failed,
  dead-lettered with its original bytes, and announced as ``job.rejected``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from agents.context import Context, RawMessage, retrying
from agents.deadletter import dead_letter, decode_all
from agents.scheduler.intake import accept_submissions, forward_ready
from streams.events import (
    Control,
    JobCancelled,
    JobEvent,
    JobFailed,
    JobRejected,
    JobStarted,
    JobSucceeded,
    encode,
)
from streams.kafka import Record

EventOrRejected = JobEvent | JobRejected
log = logging.getLogger("jobstream.dependencies")


_EVENT_NAMES: dict[type, str] = {
    JobStarted: "started",
    JobSucceeded: "succeeded",
    JobFailed: "failed",
    JobCancelled: "cancelled",
}


async def settle_cycle(ctx: Context, messages: Sequence[RawMessage]) -> int:
    """A cycle's submissions (both intake topics) and lifecycle events: validated, persisted
    and settled in one transaction; released jobs and retries forwarded to admission."""
    s = ctx.settings
    independent, dependent = ctx.topic("jobs.independent"), ctx.topic("jobs.dependent")
    accepted, rejected, origin = accept_submissions(
        ctx, [m for m in messages if m.topic == independent], dependent=False
    )
    more, rejected_dep, origin_dep = accept_submissions(
        ctx, [m for m in messages if m.topic == dependent], dependent=True
    )
    accepted += more
    rejected += rejected_dep
    origin.update(origin_dep)
    decoded, bad = decode_all(
        ctx, [m for m in messages if m.topic not in (independent, dependent)], EventOrRejected
    )
    events = [e for e in decoded if not isinstance(e, JobRejected)]
    if ctx.tracer.on:
        ctx.tracer.mark("event_in", *(e.job_id for e in events if not isinstance(e, JobStarted)))
    await dead_letter(ctx, [*rejected, *bad])
    if ctx.admission is not None:  # facts already: the limiter may count them at once
        starts = [(e.job_id, e.at) for e in events if isinstance(e, JobStarted)]
        ctx.admission.starts_reported(starts)
    store = await ctx.store()
    settled = await retrying(
        "dependency batch",
        lambda: store.settle_batch(
            accepted,
            events,
            now=time.time(),
            grace_s=s.dependency_grace_s,
            allow_cross_tenant=s.allow_cross_tenant_deps,
            backoff=s.backoff_by_kind,
            planner=ctx.admission,
        ),
    )
    ready, impossible = settled.ready, settled.rejected
    if ctx.admission is not None:
        if settled.plan is not None:
            await ctx.admission.carry_out(settled.plan, settled.admitted)
        elif settled.released:
            ctx.admission.capacity_freed()
        if settled.durations:
            ctx.admission.observe_work(settled.durations)
    m = ctx.metrics
    now = time.time()
    if ready and ctx.tracer.on:
        ctx.tracer.mark("ready", *(r.id for r in ready), at=now)
    finished_at = 0.0
    for e in events:
        tags = {"type": _EVENT_NAMES[type(e)]}
        if isinstance(e, JobFailed):
            tags["retryable"] = "true" if e.retryable else "false"
        m.count("job_events", tags)
        if not isinstance(e, JobStarted):
            finished_at = max(finished_at, e.at)
    if finished_at and ready:
        for _ in ready:  # completion (the batch's latest) → released, in the dependency stage
            m.observe("unlock_ms", max(0.0, (now - finished_at) * 1000))
    if impossible:
        await dead_letter(
            ctx, [(origin[f.job], f"job {f.job} rejected: {f.reason}") for f in impossible]
        )
        topic = ctx.topic("jobs.events")
        notices = [
            Record(
                topic,
                encode(JobRejected(job_id=f.job, at=time.time(), reason=f.reason)),
                (origin[f.job].key or f.job.encode()),
            )
            for f in impossible
        ]
        await retrying("announce rejections", lambda: ctx.producer.aproduce(notices))
    if settled.stale_starts:
        await stop_stale_attempts(ctx, settled.stale_starts)
    await forward_ready(ctx, settled.plan.forward if settled.plan is not None else ready)
    return len(messages)


async def stop_stale_attempts(ctx: Context, stale: Sequence[tuple[str, int]]) -> None:
    """Reported starts of attempts already over (handed back or cancelled before they
    started, or superseded): a cancel aimed at each attempt, for the worker that runs it."""
    topic = ctx.topic("jobs.control")
    stops = [
        Record(
            topic,
            encode(
                Control(
                    action="cancel",
                    scope="job",
                    name=job,
                    attempt=attempt,
                    reason=f"attempt {attempt} is over (handed back, cancelled or superseded)",
                    by="scheduler",
                    at=time.time(),
                )
            ),
            job.encode(),
        )
        for job, attempt in stale
    ]
    ctx.metrics.count("stale_starts_stopped", n=len(stops))
    log.warning("stopping %d started attempts that are already over", len(stops))
    await retrying("stop stale attempts", lambda: ctx.producer.aproduce(stops))
