"""A worker never leaves a dispatch in its buffer while a slot is free (real broker, worker
in-process): what a fetch brings after every slot freed meanwhile starts at once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from confluent_kafka import Consumer, Producer

from agents.context import Context
from agents.settings import Settings
from agents.worker import Worker
from streams.events import Dispatch, JobStarted, decode, encode
from streams.topics import TopicRegistry


def _dispatches(
    bootstrap: str,
    topic: str,
    n: int,
    kind: str = "no-such-kind",  # ends at once: the worker reports it cannot run it
    not_before: dict[int, float] | None = None,
) -> list[object]:
    """``n`` dispatches on the broker, consumed back as the worker's consumer gets them."""
    now = time.time()
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(n):
        d = Dispatch(
            job_id=f"b{i}",
            attempt=1,
            tenant="acme",
            kind=kind,
            args={},
            timeout_s=None,
            submitted_at=now,
            dispatched_at=now,
            not_before=(not_before or {}).get(i),
        )
        producer.produce(topic, encode(d), key=b"one-partition")
    assert producer.flush(10) == 0
    return _read(bootstrap, topic, n)


def _read(bootstrap: str, topic: str, n: int) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"buffer-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    got: list[Any] = []
    deadline = time.monotonic() + 30
    while len(got) < n and time.monotonic() < deadline:
        got += [m for m in consumer.consume(n, 0.5) if not m.error()]
    consumer.close()
    assert len(got) == n
    return got


@asynccontextmanager
async def _worker(settings: Settings, registry: TopicRegistry, slots: int) -> AsyncIterator[Worker]:
    """A worker in this process, its parts closed after."""
    ctx = Context(settings, registry)
    worker = Worker(ctx, slots=slots)
    try:
        yield worker
    finally:
        await worker.slots.close()
        await worker.reports.close()
        await worker.dispatches.close()
        await worker.control.close()
        await ctx.close()


async def _until_idle(worker: Worker) -> None:
    """Until nothing runs or is buffered (30 s at most)."""
    deadline = time.monotonic() + 30
    while (worker.slots.running or worker.backlog) and time.monotonic() < deadline:
        await worker.slots.changed_within(0.5)


def test_what_a_fetch_buffers_while_slots_are_free_starts_at_once(
    settings: Settings, registry: TopicRegistry, kafka_bootstrap: str
) -> None:
    msgs = _dispatches(kafka_bootstrap, registry.name("jobs.dispatch"), 3)

    async def scenario() -> tuple[int, int, int, int]:
        async with _worker(settings, registry, slots=2) as worker:
            # every slot is free (as when they all freed while a fetch was on its way)
            worker._buffer(msgs)
            running, buffered = len(worker.slots.running), len(worker.backlog)
            await _until_idle(worker)
            return running, buffered, worker.slots.completed, len(worker.backlog)

    running, buffered, completed, left = asyncio.run(scenario())
    assert (running, buffered) == (2, 1)  # two slots took two at once; one waits for a slot
    assert (completed, left) == (3, 0)  # the third started as soon as a slot freed


def test_a_dispatch_starts_no_earlier_than_its_not_before_and_holds_up_nothing(
    settings: Settings, registry: TopicRegistry, kafka_bootstrap: str
) -> None:
    """The first of three dispatches of one partition is not to start before 2 s from now
    (a rate limit held at the start): the two behind it start at once, it starts at its
    instant, not before, while its slot was free all along."""
    hold_until = time.time() + 2.0
    msgs = _dispatches(kafka_bootstrap, registry.name("jobs.dispatch"), 3, "noop", {0: hold_until})

    async def scenario() -> None:
        async with _worker(settings, registry, slots=3) as worker:
            worker._buffer(msgs)
            await _until_idle(worker)
            assert worker.slots.completed == 3 and not worker.backlog
            await worker.reports.close()  # every start and outcome on the broker

    asyncio.run(scenario())
    events = [m.value() for m in _read(kafka_bootstrap, registry.name("jobs.events"), 6)]
    started = {
        e.job_id: e.at
        for raw in events
        if b"job.started" in raw and isinstance(e := decode(raw), JobStarted)
    }
    assert set(started) == {"b0", "b1", "b2"}
    assert started["b0"] >= hold_until
    assert started["b1"] < hold_until and started["b2"] < hold_until
    assert started["b0"] - hold_until < 5.0  # released at its instant, not left behind
