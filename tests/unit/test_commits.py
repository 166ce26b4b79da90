"""Commit confirmations and the dispatches waiting for them (``agents.worker.commits``)."""

from __future__ import annotations

import asyncio

from agents.worker.commits import CommitWaits

TP = ("t", 0)


async def test_a_wait_resolves_once_a_commit_covers_its_offset() -> None:
    w = CommitWaits()
    a, b = w.wait(TP, 5), w.wait(TP, 9)
    w.committed([(TP, 5)])  # the next offset to read is 5: offset 5 is not covered
    await asyncio.sleep(0)
    assert not a.done() and not b.done()
    w.committed([(TP, 6)])
    assert await a is True and not b.done()
    w.committed([(TP, 3)])  # an older confirmation arriving late changes nothing
    w.committed([(TP, 20)])
    assert await b is True and len(w) == 0
    assert await w.wait(TP, 19) is True  # already covered


async def test_waits_of_a_partition_that_leaves_resolve_false() -> None:
    w = CommitWaits()
    other = ("t", 1)
    gone, stays = w.wait(TP, 1), w.wait(other, 1)
    w.abandon([TP])
    assert await gone is False and not stays.done()
    late = w.wait(TP, 1)  # back again later: the earlier confirmation does not count
    w.committed([(TP, 1)])
    assert not late.done()
    w.abandon_all()
    assert await late is False and await stays is False
