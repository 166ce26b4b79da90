"""The hot cycle: the scheduler's high-rate topics, one batch per fetch.

Submissions (``jobs.independent``, ``jobs.dependent``), lifecycle events (``jobs.events``) and
ready jobs (``jobs.ready``) are read by one batched confluent-kafka consumer, run as a task of
the faust app, instead of faust's per-event agent path (about 100 µs of CPU per event there,
three events per job; ``docs/architecture.md``). Each cycle takes whatever the consumer has
buffered, without a waiting window (one event at light load, up to ``batch_size`` under load),
and hands it to :func:`agents.scheduler.dependencies.handle_cycle`: submissions and lifecycle
events in one PostgreSQL transaction, ready jobs to the admission owner. Then the cycle's
offsets are stored, and committed every half second and before partitions move.

What the consumer has buffered is drained into two lanes (``agents.core.lanes``), up to
``LANE_BATCHES`` × ``batch_size`` messages, and each cycle takes lifecycle events and ready jobs
before submissions: a burst of submissions no longer holds the outcomes fetched behind it
(which free capacity and let admission dispatch more) until the whole burst is inserted.

Invariants:
- An offset is stored only after its cycle is durable in PostgreSQL and its follow-up events
  are confirmed by the broker; what a crash leaves uncommitted is read again, and handling it
  again changes nothing (idempotent inserts, guarded transitions).
- ``jobs.dependent`` and ``jobs.events`` are co-partitioned: the range assignor gives both
  topics' partition *i* to the same member, so one process sees a group's submissions and its
  completions, in order.
- An unexpected error in a cycle never stops the stream: the cycle is retried message by
  message, and a message that still fails is dead-lettered with the error as the reason.
- Offsets are stored per partition after the last message handled, and the lanes hand a
  partition's messages out in order, so a stored offset never skips a message; the messages
  of a partition that is revoked or lost are dropped from the lanes (its next owner reads
  them again from the committed offset).
- Consumer calls run on one thread at a time: the cycle's own thread while it waits for the
  first message, the event loop's thread (without waiting) between cycles.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from agents.context import Context, RawMessage
from agents.core.lanes import Lanes
from agents.deadletter import dead_letter
from streams.events import event_type
from streams.kafka import client_config

log = logging.getLogger("jobstream.cycle")
HOT_TOPICS = ("jobs.independent", "jobs.dependent", "jobs.events", "jobs.ready")
INTAKE_TOPICS = ("jobs.independent", "jobs.dependent")
WAIT_S = 0.2  # the longest a fetch waits on its thread before looking at ``stopping`` again
LANE_BATCHES = 20  # fetched and not handled yet: at most this many cycles' worth of messages
Handler = Callable[[Context, Sequence[RawMessage]], Awaitable[object]]


async def handle_safely(
    ctx: Context, name: str, handler: Handler, messages: Sequence[RawMessage]
) -> None:
    """``handler(messages)``; when it raises, each message alone, and a message that still
    fails is dead-lettered with the error as its reason."""
    try:
        await handler(ctx, messages)
        return
    except Exception:
        log.exception("%s: batch of %d failed; retrying one by one", name, len(messages))
    for msg in messages:
        try:
            await handler(ctx, [msg])
        except Exception as exc:
            log.exception(
                "%s: message %s[%d]@%d dead-lettered", name, msg.topic, msg.partition, msg.offset
            )
            await dead_letter(ctx, [(msg, f"internal error in {name}: {exc!r}"[:2000])])


def cycle_consumer_config(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    session_ms = int(s.scheduler_session_timeout_s * 1000)
    cfg = client_config(s.require_kafka(), s.kafka_config)
    cfg.update(
        {
            "group.id": f"{s.app_id}.cycle",
            "client.id": f"{s.app_id}-cycle",
            "auto.offset.reset": "earliest",
            # co-partitioning: partition i of jobs.dependent and of jobs.events to one member
            "partition.assignment.strategy": "range",
            "enable.auto.offset.store": False,  # stored by the cycle once it is durable
            "enable.auto.commit": True,
            "auto.commit.interval.ms": 500,
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(1000, session_ms // 4),
            # a cycle waiting out a PostgreSQL outage does not poll: stay in the group for a
            # while (beyond this the member rejoins, and what it had not stored is read again)
            "max.poll.interval.ms": 300_000,
            "fetch.wait.max.ms": 10,
        }
    )
    return cfg


class HotCycle:
    """The consumer of the hot topics and its loop of cycles."""

    def __init__(self, ctx: Context, handler: Handler, *, on_assignment: Callable[[], None]):
        self.ctx = ctx
        self.handler = handler
        self.on_assignment = on_assignment  # called on the loop when the assignment changed
        self.topics = [ctx.topic(t) for t in HOT_TOPICS]
        self.ready_topic = ctx.topic("jobs.ready")
        self.events_topic = ctx.topic("jobs.events")
        self.lanes: Lanes[RawMessage] = Lanes([ctx.topic(t) for t in INTAKE_TOPICS])
        self.consumer = Consumer(cycle_consumer_config(ctx))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cycle-consumer")
        self._busy = False  # a consumer call is on its way in ``_pool``
        self._assignment: frozenset[tuple[str, int]] | None = None
        self._intake_paused: bool | None = False  # None: not known (the assignment changed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False

    def ready_partitions(self) -> set[int] | None:
        """The ``jobs.ready`` partitions this process owns (None: not assigned yet)."""
        owned = self._assignment
        if owned is None:
            return None
        return {p for t, p in owned if t == self.ready_topic}

    # -- rebalance callbacks (on whichever thread called the consumer) ----------------------

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        log.info("cycle assigned %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
        self._assignment = frozenset((tp.topic, tp.partition) for tp in partitions)
        self._intake_paused = None  # resumed by the next cycle unless its lane is full
        self._changed()

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        log.info("cycle revoked %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
        self._commit(consumer)  # what this member handled, before the partitions move
        self._drop(partitions)
        self._assignment = frozenset()
        self._changed()

    def _on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        """The group went on without this member: nothing is committed (the partitions may
        be read elsewhere already); what was not committed is read again by their owner."""
        log.warning("cycle lost %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
        self._drop(partitions)
        self._assignment = frozenset()
        self._changed()

    def _drop(self, partitions: list[TopicPartition]) -> None:
        """Forget the fetched messages of partitions leaving this member. The callbacks run
        inside a consumer call: on the loop's thread while the lanes hold messages (only
        ``fetch_buffered`` calls the consumer then), else on the consumer's thread while the
        loop waits for a fetch with empty lanes; never beside the loop touching the lanes."""
        dropped = self.lanes.drop({(tp.topic, tp.partition) for tp in partitions})
        if dropped:
            log.info("cycle: %d fetched messages of moving partitions dropped", dropped)

    def _pace_intake(self, bound: int) -> None:
        """Pause the intake topics' partitions while ``bound`` submissions wait in their
        lane, resume them once half of those are handled. Pausing drops what the consumer
        prefetched of them (it fetches again from the next message not handed out), so the
        lifecycle events fetched behind a burst of submissions reach the urgent lane at
        once instead of after the burst. On the loop's thread, between consumer calls."""
        waiting = len(self.lanes.intake)
        if waiting >= bound and self._intake_paused is not True:
            pause = True
        elif waiting <= bound // 2 and self._intake_paused is not False:
            pause = False
        else:
            return
        intake = self.lanes.intake_topics
        parts = [TopicPartition(t, p) for t, p in self._assignment or () if t in intake]
        try:
            if parts:
                (self.consumer.pause if pause else self.consumer.resume)(parts)
            self._intake_paused = pause
        except KafkaException as exc:  # a partition revoked meanwhile: the next cycle retries
            log.info("cycle: intake %s failed (%s)", "pause" if pause else "resume", exc)

    def _changed(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_assignment)

    @staticmethod
    def _commit(consumer: Any) -> None:
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:  # nothing stored since the last commit, or no group
            log.debug("cycle commit: %s", exc)

    # -- fetching ---------------------------------------------------------------------------

    async def _on_thread(self, fn: Callable[[], Any]) -> Any:
        self._busy = True
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        finally:
            self._busy = False

    def _wait_fetch(self, room: int, timeout_s: float) -> list[Any]:
        """Up to ``room`` messages, returning as soon as one is there (``consume(n, t)``
        would wait for all ``n`` or the whole timeout)."""
        first = self.consumer.poll(timeout_s)
        if first is None:
            return []
        if room <= 1:
            return [first]
        return [first, *self.consumer.consume(num_messages=room - 1, timeout=0)]

    def fetch_buffered(self, room: int) -> list[Any]:
        """What the consumer has buffered now, up to ``room``, on the loop's thread."""
        return list(self.consumer.consume(num_messages=room, timeout=0)) if room > 0 else []

    async def fetch(self, room: int, timeout_s: float = WAIT_S) -> list[Any]:
        """What is buffered now, taken on the loop's thread without waiting; else wait on
        the consumer's thread for the first message, up to ``timeout_s``."""
        if not self._busy:
            now = self.fetch_buffered(room)
            if now:
                return now
        return list(await self._on_thread(lambda: self._wait_fetch(room, timeout_s)))

    def _raw(self, msgs: Sequence[Any]) -> list[RawMessage]:
        out: list[RawMessage] = []
        for m in msgs:
            if m.error():
                log.warning("cycle consumer: %s", m.error())
                continue
            out.append(RawMessage(m.topic(), m.partition(), m.offset(), m.key(), m.value()))
        return out

    def _only_starts(self, batch: Sequence[RawMessage]) -> bool:
        return all(
            m.topic == self.events_topic and event_type(m.value) == "job.started" for m in batch
        )

    async def _hold_starts(self, batch: list[RawMessage]) -> None:
        """A batch made only of job starts waits up to ``start_hold_s`` for more events: a
        short job's outcome then shares its start's transaction instead of waiting behind it."""
        hold_s = self.ctx.settings.start_hold_s
        limit = self.ctx.settings.batch_size
        deadline = time.monotonic() + hold_s
        while hold_s > 0 and len(batch) < limit and self._only_starts(batch):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            batch.extend(self._raw(await self.fetch(limit - len(batch), left)))

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._on_thread(
            lambda: self.consumer.subscribe(
                self.topics,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        )
        limit = self.ctx.settings.batch_size
        bound = LANE_BATCHES * limit
        lanes = self.lanes
        try:
            while not self.stopping:
                if lanes:  # work waits: add what is buffered, without waiting for more
                    lanes.add(self._raw(self.fetch_buffered(max(bound - len(lanes), limit))))
                else:
                    lanes.add(self._raw(await self.fetch(bound)))
                self._pace_intake(bound)
                if not lanes:
                    continue
                batch = lanes.take(limit)
                if not lanes:
                    await self._hold_starts(batch)
                await handle_safely(self.ctx, "cycle", self.handler, batch)
                self._store(batch)
        finally:
            await self._on_thread(self.consumer.close)  # commits what was stored
            self._pool.shutdown(wait=False)

    def _store(self, batch: Sequence[RawMessage]) -> None:
        """Store the next offset to read of every partition in the batch (committed by the
        consumer every ``auto.commit.interval.ms``, on revoke and on close)."""
        ends: dict[tuple[str, int], int] = {}
        for m in batch:
            key = (m.topic, m.partition)
            ends[key] = max(ends.get(key, -1), m.offset + 1)
        owned = self._assignment or frozenset()
        offsets = [TopicPartition(t, p, o) for (t, p), o in ends.items() if (t, p) in owned]
        if not offsets:
            return  # revoked meanwhile: the next owner reads them again
        try:
            self.consumer.store_offsets(offsets=offsets)
        except KafkaException as exc:  # a partition revoked between the check and the store
            log.info("cycle: offsets not stored (%s); they are read again", exc)
