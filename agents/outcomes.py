"""Worker heartbeats → the ``workers`` table (liveness and capacity are read from there)."""

from __future__ import annotations

from collections.abc import Sequence

from agents.context import Context, RawMessage, retrying
from agents.deadletter import dead_letter, decode_all
from streams.events import WorkerHeartbeat


async def handle_heartbeats(ctx: Context, messages: Sequence[RawMessage]) -> int:
    beats, rejected = decode_all(ctx, messages, WorkerHeartbeat)
    await dead_letter(ctx, rejected)
    store = await ctx.store()
    await retrying("record heartbeats", lambda: store.record_heartbeats(beats))
    return len(beats)
