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
from agents.deadletter import dead_letter, decode_all
from agents.intake import forward_ready
from streams.events import JobEvent, WorkerHeartbeat


async def handle_events(ctx: Context, messages: Sequence[RawMessage]) -> int:
    events, rejected = decode_all(ctx, messages, JobEvent)
    await dead_letter(ctx, rejected)
    store = await ctx.store()
    ready = await retrying("apply events", lambda: store.apply_events(events))
    await forward_ready(ctx, ready)
    return len(events)


async def handle_heartbeats(ctx: Context, messages: Sequence[RawMessage]) -> int:
    beats, rejected = decode_all(ctx, messages, WorkerHeartbeat)
    await dead_letter(ctx, rejected)
    store = await ctx.store()
    await retrying("record heartbeats", lambda: store.record_heartbeats(beats))
    return len(beats)
