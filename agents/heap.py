"""Keeping the cyclic garbage collector's full collections short in the long-running processes.

A full (generation 2) collection walks every object the collector tracks and stops the event
loop meanwhile. In the scheduler that is everything faust, aiokafka, psycopg and the app
allocated at start-up: a collection took 50-65 ms in the middle of a light-load run (measured
with ``gc.callbacks``), and every unlock in flight waited for it (the unlock p99's tail).
Objects that live as long as the process are moved out of the collector's sight once the
process is set up (``gc.freeze``): full collections then walk only what was allocated since.

Invariants:
- Only what exists at a freeze is frozen, and a freeze happens only while the process sets
  up (at most ``MAX_FREEZES`` times), so garbage made while running is collected as usual;
  what a freeze keeps is bounded by the start-up heap.
- Nothing here changes what the processes do, only when the collector runs and over what.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger("jobstream.heap")
MAX_FREEZES = 3
POLL_S = 0.5
_freezes = 0


def freeze_startup_heap(stage: str) -> None:
    """Collect what start-up left behind, then exclude every surviving object from future
    collections. Call when a long-running process has set up ``stage`` (imports and the app
    built; partitions assigned and clients connected)."""
    global _freezes
    if _freezes >= MAX_FREEZES:
        return
    _freezes += 1
    began = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug(
        "heap frozen after %s: %d objects out of the collector's sight (%.1f ms)",
        stage,
        gc.get_freeze_count(),
        (time.perf_counter() - began) * 1000,
    )


async def freeze_once_assigned(
    assigned: Callable[[], object], settle_s: float = 2.0, limit_s: float = 60.0
) -> None:
    """Freeze again once ``assigned()`` is true (the process owns partitions: its clients'
    and agents' long-lived state exists) and ``settle_s`` more have passed; after
    ``limit_s`` without an assignment, freeze anyway. Run as a task in a long-running
    process."""
    for _ in range(int(limit_s / POLL_S)):  # the scheduler's assignment can only be polled
        if assigned():
            break
        await asyncio.sleep(POLL_S)
    await asyncio.sleep(settle_s)
    freeze_startup_heap("partitions assigned")
