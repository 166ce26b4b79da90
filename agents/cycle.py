"""The hot cycle: the scheduler's high-rate topics, one batch per fetch.

Submissions (``jobs.independent``, ``jobs.dependent``), lifecycle events (``jobs.events``) and
ready jobs (``jobs.ready``) are read by one batched confluent-kafka consumer, run as a task of
the faust app, instead of faust's per-event agent path (about 100 µs of CPU per event there,
three events per job; ``docs/architecture.md``). Each cycle takes whatever the consumer has
buffered, without a waiting window (one event at light load, up to ``batch_size`` under load),
and hands it to :func:`agents.dependencies.handle_cycle`: submissions and lifecycle events in
one PostgreSQL transaction, ready jobs to the admission owner. Then the cycle's offsets are
stored, and committed every half second and before partitions move.

Invariants:
- An offset is stored only after its cycle is durable in PostgreSQL and its follow-up events
  are confirmed by the broker; what a crash leaves uncommitted is read again, and handling it
  again changes nothing (idempotent inserts, guarded transitions).
- ``jobs.dependent`` and ``jobs.events`` are co-partitioned: the range assignor gives both
  topics' partition *i* to the same member, so one process sees a group's submissions and its
  completions, in order.
- An unexpected error in a cycle never stops the stream: the cycle is retried message by
  message, and a message that still fails is dead-lettered with the error as the reason.
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
from agents.deadletter import dead_letter
from streams.events import event_type
from streams.kafka import client_config

log = logging.getLogger("jobstream.cycle")
HOT_TOPICS = ("jobs.independent", "jobs.dependent", "jobs.events", "jobs.ready")
WAIT_S = 0.2  # the longest a fetch waits on its thread before looking at ``stopping`` again
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
        self.consumer = Consumer(cycle_consumer_config(ctx))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cycle-consumer")
        self._busy = False  # a consumer call is on its way in ``_pool``
        self._assignment: frozenset[tuple[str, int]] | None = None
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
        self._changed()

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        log.info("cycle revoked %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
        self._commit(consumer)  # what this member handled, before the partitions move
        self._assignment = frozenset()
        self._changed()

    def _on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        """The group went on without this member: nothing is committed (the partitions may
        be read elsewhere already); what was not committed is read again by their owner."""
        log.warning("cycle lost %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
        self._assignment = frozenset()
        self._changed()

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

    async def fetch(self, room: int, timeout_s: float = WAIT_S) -> list[Any]:
        """What is buffered now, taken on the loop's thread without waiting; else wait on
        the consumer's thread for the first message, up to ``timeout_s``."""
        if not self._busy:
            now = self.consumer.consume(num_messages=room, timeout=0)
            if now:
                return list(now)
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
        try:
            while not self.stopping:
                batch = self._raw(await self.fetch(limit))
                if not batch:
                    continue
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
