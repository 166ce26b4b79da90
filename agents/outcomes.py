"""Outcomes: apply lifecycle events from workers to PostgreSQL; forward what became ready.

Invariants:
- Events are applied in partition order inside one transaction per batch, each guarded by
  state and attempt (``agents.core.lifecycle``): duplicates and stale attempts change nothing.
- A success unlocks dependents whose every dependency succeeded; a final failure or a
  cancellation fails waiting dependents transitively, naming the root cause.
- A retryable failure with attempts left puts the job back to ``ready`` and forwards it.
"""

from __future__ import annotations

from collections.abc import Sequence

from agents.context import Context, RawMessage, retrying
from agents.deadletter import dead_letter
from agents.intake import ready_records
from streams.errors import InvalidEvent
from streams.events import JobEvent, WorkerHeartbeat, decode

_JOB_EVENT = JobEvent


async def handle_events(ctx: Context, messages: Sequence[RawMessage]) -> int:
    events: list[JobEvent] = []
    rejected: list[tuple[RawMessage, str]] = []
    for msg in messages:
        try:
            events.append(decode(msg.value, _JOB_EVENT, max_bytes=ctx.settings.max_payload_bytes))
        except InvalidEvent as exc:
            rejected.append((msg, str(exc)))
    await dead_letter(ctx, rejected)
    store = await ctx.store()
    ready = await retrying("apply events", lambda: store.apply_events(events))
    records = ready_records(ctx, ready)
    await retrying("forward ready", lambda: ctx.producer.aproduce(records))
    return len(events)


async def handle_heartbeats(ctx: Context, messages: Sequence[RawMessage]) -> int:
    beats: list[WorkerHeartbeat] = []
    rejected: list[tuple[RawMessage, str]] = []
    for msg in messages:
        try:
            beats.append(
                decode(msg.value, WorkerHeartbeat, max_bytes=ctx.settings.max_payload_bytes)
            )
        except InvalidEvent as exc:
            rejected.append((msg, str(exc)))
    await dead_letter(ctx, rejected)
    store = await ctx.store()
    await retrying("record heartbeats", lambda: store.record_heartbeats(beats))
    return len(beats)
