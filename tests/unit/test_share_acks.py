"""The share-group worker's bookkeeping: which acquired records are finished, the broker's
answers to their acknowledgements, and the group's timers."""

from __future__ import annotations

import asyncio

from agents.worker.commits import CommitWaits
from agents.worker.share import ShareAcks, group_timers

TP = ("t.jobs.dispatch", 0)


def test_acks_settle_once_every_acquired_record_is_finished() -> None:
    acks = ShareAcks()
    settled: list[int] = []
    acks.on_settled = lambda: settled.append(1)
    acks.started(TP, 5)
    acks.started(TP, 6)
    acks.finished(TP, 6)
    assert acks.pending == {(TP, 5)} and not settled
    acks.finished(TP, 9)  # never acquired here: nothing to acknowledge
    acks.finished(TP, 5)
    assert not acks.pending and settled == [1]
    assert acks.take_done() == [(TP, 6), (TP, 5)] and acks.take_done() == []


def test_an_acknowledgement_answers_exactly_its_own_records() -> None:
    async def run() -> tuple[bool, bool, bool, bool]:
        waits = CommitWaits()
        a, b = waits.wait(TP, 3), waits.wait(TP, 7)
        waits.acknowledged(TP, {7}, False)  # a position would have answered 3 too
        assert not a.done()
        waits.acknowledged(TP, {3}, True)
        waits.acknowledged(TP, {11}, True)  # answered before anyone waits
        early = waits.wait(TP, 11)
        return await a, await b, early.done(), await early

    assert asyncio.run(run()) == (True, False, True, True)


def test_group_timers_follow_the_lost_bound_within_the_brokers_range() -> None:
    assert group_timers(15.0) == {
        "share.session.timeout.ms": "15000",
        "share.heartbeat.interval.ms": "3750",
        "share.record.lock.duration.ms": "15000",
    }
    assert group_timers(1.0)["share.session.timeout.ms"] == "6000"
    assert group_timers(600.0)["share.session.timeout.ms"] == "60000"
    assert group_timers(6.0)["share.heartbeat.interval.ms"] == "1500"
