"""A worker never leaves a dispatch in its buffer while a slot is free (real broker, worker
in-process): what a fetch brings after every slot freed meanwhile starts at once."""

from __future__ import annotations

import asyncio
import time
import uuid

from confluent_kafka import Consumer, Producer

from agents.context import Context
from agents.settings import Settings
from agents.worker import Worker
from streams.events import Dispatch, encode
from streams.topics import TopicRegistry


def _dispatches(bootstrap: str, topic: str, n: int) -> list[object]:
    """``n`` dispatches on the broker, consumed back as the worker's consumer gets them."""
    now = time.time()
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(n):
        d = Dispatch(
            job_id=f"b{i}",
            attempt=1,
            tenant="acme",
            kind="no-such-kind",  # ends at once: the worker reports it cannot run it
            args={},
            timeout_s=None,
            submitted_at=now,
            dispatched_at=now,
        )
        producer.produce(topic, encode(d), key=d.job_id.encode())
    assert producer.flush(10) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"buffer-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    got: list[object] = []
    deadline = time.monotonic() + 30
    while len(got) < n and time.monotonic() < deadline:
        got += [m for m in consumer.consume(n, 0.5) if not m.error()]
    consumer.close()
    assert len(got) == n
    return got


def test_what_a_fetch_buffers_while_slots_are_free_starts_at_once(
    settings: Settings, registry: TopicRegistry, kafka_bootstrap: str
) -> None:
    msgs = _dispatches(kafka_bootstrap, registry.name("jobs.dispatch"), 3)

    async def scenario() -> tuple[int, int, int, int]:
        ctx = Context(settings, registry)
        worker = Worker(ctx, slots=2)
        try:
            # every slot is free (as when they all freed while a fetch was on its way)
            worker._buffer(msgs)
            running, buffered = len(worker.slots.running), len(worker.backlog)
            deadline = time.monotonic() + 30
            while (worker.slots.running or worker.backlog) and time.monotonic() < deadline:
                await worker.slots.changed_within(0.5)
            return running, buffered, worker.slots.completed, len(worker.backlog)
        finally:
            await worker.slots.close()
            await worker.reports.close()
            await worker.dispatches.close()
            await worker.control.close()
            await ctx.close()

    running, buffered, completed, left = asyncio.run(scenario())
    assert (running, buffered) == (2, 1)  # two slots took two at once; one waits for a slot
    assert (completed, left) == (3, 0)  # the third started as soon as a slot freed
