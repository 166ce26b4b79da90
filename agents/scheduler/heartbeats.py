"""Worker heartbeats → the ``workers`` table (liveness and capacity are read from there)."""

from __future__ import annotations

from collections.abc import Sequence

from agents.context import Context, RawMessage, retrying
from agents.deadletter import dead_letter, decode_all
from streams.events import WorkerHeartbeat


async def handle_heartbeats(ctx: Context, messages: Sequence[RawMessage]) -> int:
    beats, rejected = decode_all(ctx, messages, WorkerHeartbeat)
    for b in beats:
        ctx.metrics.count("heartbeats_received", {"worker": b.worker})
    await dead_letter(ctx, rejected)
    progress: dict[int, int] = {}
    for m in messages:  # the next offset to record, per partition
        progress[m.partition] = max(progress.get(m.partition, 0), m.offset + 1)
    store = await ctx.store()
    s = ctx.settings
    await retrying(
        "record heartbeats",
        lambda: store.record_heartbeats(
            beats,
            capacity_factor=s.capacity_factor,
            lost_after_s=s.worker_lost_after_s,
            progress=progress,
        ),
    )
    return len(beats)
