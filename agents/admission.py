"""Admission, first in first out: the walking skeleton's stage, replaced by the admission
control of a later issue (rate limits, priority, fair share, semaphores).

Invariants:
- A job is dispatched only from ``ready`` (guarded), with a new attempt number; the dispatch
  is marked confirmed only after the broker acknowledged it, so a crash in between leaves the
  job ``dispatched`` and unconfirmed, and the replay (or the reconciler) sends it again.
- Malformed messages on ``jobs.ready`` are dead-lettered, never fatal.
"""

from __future__ import annotations

from collections.abc import Sequence

from agents.context import Context, RawMessage, retrying
from agents.deadletter import dead_letter, decode_all
from agents.rows import DispatchJob
from streams.events import Dispatch, JobReady, encode
from streams.kafka import Record


def dispatch_records(ctx: Context, jobs: Sequence[DispatchJob]) -> list[Record]:
    topic = ctx.topic("jobs.dispatch")
    return [
        Record(
            topic,
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
                )
            ),
            j.id.encode(),
        )
        for j in jobs
    ]


async def dispatch_ids(ctx: Context, ids: Sequence[str]) -> int:
    store = await ctx.store()
    claimed = await retrying("admission claim", lambda: store.claim_for_dispatch(ids))
    records = dispatch_records(ctx, claimed)
    await retrying("dispatch produce", lambda: ctx.producer.aproduce(records))
    await retrying("dispatch confirm", lambda: store.confirm_dispatch(claimed))
    return len(claimed)


async def handle_ready(ctx: Context, messages: Sequence[RawMessage]) -> int:
    ready, rejected = decode_all(ctx, messages, JobReady)
    ids = [ev.job_id for ev in ready]
    await dead_letter(ctx, rejected)
    # keep arrival order, drop duplicates within the batch
    return await dispatch_ids(ctx, list(dict.fromkeys(ids)))
