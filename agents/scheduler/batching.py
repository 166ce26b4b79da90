"""Natural batching for faust streams (the low-rate agents): hand over whatever has arrived.

faust's ``take(max, within)`` waits up to ``within`` for a batch to fill, so every stage adds
up to that much latency at light load, and a small ``within`` turns into a busy timer. Here
the agent wakes as soon as one event is buffered and takes everything buffered so far (at most
``max_``); events keep buffering while a batch is handled, so under load batches grow by
themselves and no timer runs when idle. Acks stay with the caller (manual, after the batch is
durable).

Invariants: events are handed over in stream order, each exactly once; at most ``max_`` are
buffered (the stream's drainer waits beyond that: backpressure).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


async def take_available(
    stream: Any, max_: int, *, linger_s: float = 0.0
) -> AsyncIterator[list[Any]]:
    """Yield lists of faust events from ``stream`` (a ``noack()`` stream) as they arrive.

    ``linger_s`` > 0 waits that long after the first event for more (fewer, larger
    batches at the cost of latency); 0 hands over at once."""
    buffer: list[Any] = []
    arrived = asyncio.Event()
    room = asyncio.Event()
    room.set()

    async def add_to_buffer(value: Any) -> Any:
        while len(buffer) >= max_ and not stream.should_stop:
            room.clear()
            await stream.wait(room)
        event = stream.current_event
        if event is None:  # pragma: no cover - faust sets it for every value it processes
            raise RuntimeError("stream has no current event")
        buffer.append(event)
        arrived.set()
        return value

    stream.enable_acks = False
    stream.add_processor(add_to_buffer)
    stream._enable_passive(stream.channel.__aiter__())
    try:
        while not stream.should_stop:
            await stream.wait_for_stopped(arrived, timeout=1.0)
            if not buffer:
                continue
            if linger_s and len(buffer) < max_:
                await asyncio.sleep(linger_s)
            else:
                await asyncio.sleep(0)  # let events already queued in the channel join
            batch = buffer[:max_]
            del buffer[: len(batch)]
            if not buffer:
                arrived.clear()
            room.set()
            yield batch
    finally:
        stream._processors.remove(add_to_buffer)
