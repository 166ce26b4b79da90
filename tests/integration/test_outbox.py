"""The worker's outbox on a real broker: records sent while the pacer holds go out together,
each caller learns its own record's fate, and everything confirmed is on the topic."""

from __future__ import annotations

import asyncio
import time

import pytest

from agents.core.pacing import Pacer
from agents.worker.outbox import Outbox
from streams.errors import DeliveryFailed
from streams.kafka import ConfirmedProducer, Record, partition_for, producer_config
from streams.topics import TopicRegistry
from tests.helpers import read_topic


async def test_records_queued_while_paced_share_one_send(
    kafka_bootstrap: str, registry: TopicRegistry
) -> None:
    topic = registry.name("jobs.events")
    producer = ConfirmedProducer(producer_config(kafka_bootstrap))
    producer.produce_confirmed([Record(topic, b"warm", b"w")])  # connected, metadata known
    box = Outbox(producer, Pacer(rate_per_s=0.5, burst=1))  # one send, then one per 2 s
    try:
        await box.send(Record(topic, b"first", b"k0"))  # a token: goes at once, alone
        assert (box.batches, box.records) == (1, 1)
        # the next 60 arrive over several loop turns while the pacer holds: one send
        waiting = []
        for i in range(60):
            waiting.append(box.send(Record(topic, f"r{i}".encode(), f"k{i % 7}".encode())))
            if i % 10 == 9:
                await asyncio.sleep(0.01)
        await asyncio.gather(*waiting)
        assert (box.batches, box.records) == (2, 61)
        # an urgent record does not wait for the pacer, which would hold it ~2 s now
        assert box.pacer.wait(time.monotonic()) > 1.0
        t0 = time.monotonic()
        await box.send(Record(topic, b"urgent", b"u"), urgent=True)
        assert time.monotonic() - t0 < 1.0
        assert (box.batches, box.records) == (3, 62)
    finally:
        await box.close()
        producer.close()
    values = {m.value() for m in read_topic(kafka_bootstrap, topic, expect=63)}
    assert values == {b"warm", b"first", b"urgent", *(f"r{i}".encode() for i in range(60))}


async def test_a_bad_record_fails_alone(kafka_bootstrap: str, registry: TopicRegistry) -> None:
    topic = registry.name("jobs.events")
    producer = ConfirmedProducer(producer_config(kafka_bootstrap))
    box = Outbox(producer, Pacer(rate_per_s=100, burst=1))
    try:
        await box.send(Record(topic, b"warm", b"w"))  # metadata known: partition 999 is refused
        good = [box.send(Record(topic, f"g{i}".encode(), b"k")) for i in range(5)]
        bad = box.send(Record(topic, b"bad", b"k", partition=999))
        more = [box.send(Record(topic, f"h{i}".encode(), b"k")) for i in range(5)]
        await asyncio.gather(*good, *more)
        with pytest.raises(DeliveryFailed):
            await bad
        assert box.batches == 2  # the bad record travelled with the good ones
    finally:
        await box.close()
        producer.close()
    values = {m.value() for m in read_topic(kafka_bootstrap, topic, expect=11)}
    assert b"bad" not in values and len(values) == 11


async def test_a_batch_lands_where_one_by_one_would(
    kafka_bootstrap: str, registry: TopicRegistry
) -> None:
    """Records without headers go to librdkafka in one call per topic and partition
    (``produce_batch``); keyed ones must still land on their key's partition (the keyed
    ownership of jobs.events and jobs.dependent depends on it), and records with a set
    partition on that one (dispatches go to their job's partition), whatever their key."""
    events, dependent = registry.name("jobs.events"), registry.name("jobs.dependent")
    parts = registry["jobs.events"].partitions
    assert parts > 1
    producer = ConfirmedProducer(producer_config(kafka_bootstrap))
    keys = [f"group-{i}".encode() for i in range(40)]
    try:
        await producer.aproduce(
            [Record(events, b"batched", k) for k in keys]
            + [Record(dependent, b"batched", k) for k in keys[:5]]
        )
        # with a header: one by one, on the same partitions
        await producer.aproduce([Record(events, b"single", k, headers=[("h", b"1")]) for k in keys])
        # a set partition wins over the key, batched per partition
        await producer.aproduce(
            [Record(dependent, b"placed", k, partition=i % parts) for i, k in enumerate(keys)]
        )
    finally:
        producer.close()
    got = list(read_topic(kafka_bootstrap, events, expect=80))
    assert len(got) == 80
    for m in got:
        assert m.partition() == partition_for(m.key(), parts), m.key()
    assert {m.key() for m in got if m.value() == b"batched"} == set(keys)
    placed = [
        m for m in read_topic(kafka_bootstrap, dependent, expect=45) if m.value() == b"placed"
    ]
    assert len(placed) == 40
    for m in placed:
        assert m.partition() == keys.index(m.key()) % parts, m.key()


async def test_a_batch_larger_than_the_local_queue_is_all_sent(
    kafka_bootstrap: str, registry: TopicRegistry
) -> None:
    """``produce_batch`` refuses what does not fit librdkafka's queue record by record: those
    records wait for room like single sends, they do not fail."""
    topic = registry.name("jobs.events")
    producer = ConfirmedProducer(
        producer_config(kafka_bootstrap, {"queue.buffering.max.messages": 5})
    )
    try:
        settled: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        producer.produce_then(
            [Record(topic, f"q{i}".encode(), f"k{i}".encode()) for i in range(40)],
            settled.set_result,
        )
        failed = await settled
    finally:
        producer.close()
    assert failed == {}
    got = {m.value() for m in read_topic(kafka_bootstrap, topic, expect=40)}
    assert got == {f"q{i}".encode() for i in range(40)}
