"""The start-up heap freeze: survivors leave the collector's sight, garbage made afterwards is
still collected, and the number of freezes is bounded."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from agents import heap


@pytest.fixture
def fresh_heap(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(heap, "_freezes", 0)
    yield
    gc.unfreeze()  # the test process's own heap goes back to normal collections


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> tuple[Node, Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a, b


def test_survivors_are_frozen_and_later_garbage_is_collected(fresh_heap: None) -> None:
    kept = cycle()  # start-up state: survives the freeze's collection, then frozen
    heap.freeze_startup_heap("test")
    assert gc.get_freeze_count() > 0
    assert kept[0].other is kept[1]
    frozen_before = gc.get_freeze_count()

    late = cycle()  # made after the freeze, then dropped: a cycle only the collector frees
    probe = weakref.ref(late[0])
    del late
    gc.collect()
    assert probe() is None
    assert gc.get_freeze_count() == frozen_before  # nothing was frozen by collecting


def test_freezes_stop_after_the_start_up_stages(fresh_heap: None) -> None:
    for stage in range(heap.MAX_FREEZES):
        heap.freeze_startup_heap(f"stage {stage}")
    frozen = gc.get_freeze_count()
    late = cycle()
    heap.freeze_startup_heap("one more")  # past the bound: does nothing
    assert gc.get_freeze_count() == frozen
    probe = weakref.ref(late[0])
    del late
    gc.collect()
    assert probe() is None


async def test_the_second_freeze_waits_for_the_assignment(fresh_heap: None) -> None:
    owned = [False]
    task = asyncio.create_task(heap.freeze_once_assigned(lambda: owned[0], settle_s=0.0))
    await asyncio.sleep(2 * heap.POLL_S)
    assert heap._freezes == 0  # no partitions yet: nothing frozen
    owned[0] = True
    await asyncio.wait_for(task, 5)
    assert heap._freezes == 1
