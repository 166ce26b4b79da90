"""The worker's member of the ``<app_id>.workers`` consumer group: fetching dispatches,
rebalances, pausing, and the offset commits that hand a dispatch from Kafka to the monitor.

Invariants:
- Consumer calls run on one dedicated thread, except a fetch of what librdkafka already
  holds and an asynchronous commit, taken on the loop thread while that thread is idle (a
  call beside a running ``poll`` would wait for it).
- An offset is committed once it is finished in the tracker (its job's start confirmed, or
  the dispatch skipped or dead-lettered); commits are paced (``agents.core.pacing``) and
  signed with the worker's id; synchronous only on revoke, drain and exit.
- Partitions that leave (revoked or lost) drop their buffered dispatches and their
  tracker state; a revoke commits first, a loss does not (the group went on without us).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from agents.context import Context
from agents.core.offsets import OffsetTracker
from agents.core.pacing import Pacer
from agents.worker.commits import CommitWaits
from streams.kafka import client_config

log = logging.getLogger("jobstream.worker")
TP = tuple[str, int]
# how a worker consumes ``jobs.dispatch`` (also the floor's bare loop, bench/floor.py):
# offsets committed by the worker once a start is confirmed, partitions moved one at a time,
# and a fetch answered within 10 ms when nothing is there
DISPATCH_CONSUMER: dict[str, Any] = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    "fetch.wait.max.ms": 10,
}


class DispatchConsumer:
    def __init__(self, ctx: Context, worker_id: str) -> None:
        s = ctx.settings
        self.id = worker_id
        self.tracker: OffsetTracker[TP] = OffsetTracker()
        self.waits = CommitWaits()  # dispatches of shared-resource jobs wait for their commit
        self.owned: frozenset[TP] = frozenset()  # dispatch partitions held now
        self.assigned = asyncio.Event()
        self.paused = False
        # partitions that left: their buffered dispatches go (set by the worker)
        self.on_drop: Callable[[set[TP]], None] = lambda _gone: None
        burst = max(1.0, s.worker_sends_per_s / 10)
        self._pacer = Pacer(s.worker_sends_per_s, burst)
        self._soon = False
        self._recommit = False  # an asynchronous commit failed: the next one sends all
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kafka-consumer")
        self._busy = 0  # consumer calls on their way in ``_pool``
        self._background: set[asyncio.Future[Any]] = set()
        cfg = client_config(s.require_kafka(), s.kafka_config)
        session_ms = int(min(1_800_000, max(6_000, s.worker_lost_after_s * 1000)))  # broker bounds
        cfg.update(
            {
                **DISPATCH_CONSUMER,
                "group.id": f"{s.app_id}.workers",
                "client.id": worker_id,
                # also the rebalance timeout: how long a join can wait for a member that
                # does not answer; the consumer thread polls every 50 ms even when full
                "max.poll.interval.ms": 30_000,
                # a dead worker's partitions move when the monitor declares it lost, not 45 s
                # later: its jobs' retries (same key, same partition) must reach a live worker
                "session.timeout.ms": session_ms,
                "heartbeat.interval.ms": max(500, session_ms // 4),
                "on_commit": self._on_commit,
            }
        )
        self.consumer = Consumer(cfg)

    async def call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)`` on the consumer's thread."""
        self._busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: fn(*args, **kw)
            )
        finally:
            self._busy -= 1

    async def subscribe(self, topics: list[str]) -> None:
        loop = self._loop = asyncio.get_running_loop()

        def on_assign(_consumer: Any, partitions: list[TopicPartition]) -> None:
            log.info("assigned %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
            # incremental (cooperative); replaced, never changed in place: the heartbeat
            # reads it on the loop thread while a consumer callback may run on another
            self.owned = self.owned | {(tp.topic, tp.partition) for tp in partitions}
            if partitions:
                loop.call_soon_threadsafe(self.assigned.set)

        await self.call(
            self.consumer.subscribe,
            topics,
            on_assign=on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    async def fetch(self, room: int) -> list[Any]:
        """Up to ``room`` messages: what librdkafka already holds, taken on the loop thread
        when the consumer thread is idle (under load nearly every fetch: no thread hand-off),
        else from the consumer thread, returning as soon as one is there."""
        if not self._busy:
            msgs = self.consumer.consume(num_messages=room, timeout=0)
            if msgs:
                return msgs
        return await self.call(self._poll, room)  # type: ignore[no-any-return]

    def _poll(self, room: int) -> list[Any]:
        """``consume(n, timeout)`` waits for all ``n`` or the whole timeout (librdkafka's
        batch call), which would add up to the timeout to every dispatch at light load;
        ``poll`` returns on the first."""
        first = self.consumer.poll(0.05)
        if first is None:
            return []
        if room <= 1:
            return [first]
        return [first, *self.consumer.consume(num_messages=room - 1, timeout=0)]

    async def consume_now(self, n: int) -> list[Any]:
        """What is there now, up to ``n`` (keeps the member in its group while full)."""
        return await self.call(self.consumer.consume, max(1, n), 0)  # type: ignore[no-any-return]

    async def set_paused(self, paused: bool) -> None:
        assignment = await self.call(self.consumer.assignment)
        if paused:
            await self.call(self.consumer.pause, assignment)
        else:
            await self.call(self.consumer.resume, assignment)
        self.paused = paused

    # -- rebalances ------------------------------------------------------------------

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
        # commit what started here before the partitions move (the coordinator is there:
        # a revoke is a rebalance it runs; one round trip on whichever thread consumed)
        self._commit_positions(consumer, asynchronous=False)
        self._drop(partitions)

    def _on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        """The group went on without this member (its session timed out, e.g. the broker
        was away): the partitions may be owned elsewhere already, so nothing is committed
        (a synchronous commit would wait for a coordinator that is not there, and block the
        event loop when the loop thread consumed). What started here and was not committed
        is redelivered to the next owner and fenced by attempt."""
        log.warning(
            "lost %s (session timed out)", [f"{tp.topic}[{tp.partition}]" for tp in partitions]
        )
        self._drop(partitions)

    def _drop(self, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.owned = self.owned - gone
        self._on_loop(self.waits.abandon, gone)  # after the revoke's commit is noted
        for tp in gone:
            self.tracker.forget(tp)
        self.on_drop(gone)

    def _on_loop(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the event loop's thread (callbacks come from whichever thread
        called the consumer), in the order of the calls."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(fn, *args)

    async def leave_group(self) -> None:
        """Unsubscribe and serve the revoke (bounded), so the partitions go to live workers
        now: what started here is committed on the revoke, what was buffered is read again
        by the next owner."""
        try:
            await self.call(self.consumer.unsubscribe)
            deadline = time.monotonic() + 5.0
            while self.owned and time.monotonic() < deadline:
                # serves the revoke; a message it may still return was never started here
                await self.call(self.consumer.poll, 0.1)
        except KafkaException as exc:
            log.warning("draining: could not leave the consumer group at once: %s", exc)

    # -- commits ---------------------------------------------------------------------

    def _on_commit(self, err: Any, partitions: Any) -> None:
        """The broker's answer to an asynchronous commit (consumer thread)."""
        if err is not None:
            log.warning("commit failed (the next one resends every position): %s", err)
            self._recommit = True
            self._on_loop(self.commit_soon)  # dispatches may wait for it
            return
        self._note_committed(partitions or [])

    def _note_committed(self, partitions: list[TopicPartition]) -> None:
        done = [
            ((tp.topic, tp.partition), tp.offset)
            for tp in partitions
            if tp.error is None and tp.offset >= 0
        ]
        if done:
            self._on_loop(self.waits.committed, done)

    def _commit_positions(self, consumer: Any, *, asynchronous: bool) -> None:
        """Commit what the tracker allows (a failed commit is retried by the next one)."""
        recommit, self._recommit = self._recommit, False
        positions = self.tracker.commit_positions(everything=recommit)
        if not positions:
            return
        # signed with this worker's id: ``committed_past`` tells its own commit from a
        # next owner's
        offsets = [TopicPartition(t, p, off, self.id) for (t, p), off in positions.items()]
        try:
            done = consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as exc:
            log.warning("commit failed (the next one resends every position): %s", exc)
            self._recommit = True
            return
        if not asynchronous and done:
            self._note_committed(done)

    def commit_soon(self) -> None:
        """One commit for every finished offset until it goes: at once while the pacer has
        tokens, else when it has one again (a commit request costs what a produce does)."""
        if self._soon:
            return
        self._soon = True
        loop = asyncio.get_running_loop()
        wait = self._pacer.wait(time.monotonic())
        if wait > 0:
            loop.call_later(wait, self._commit_now)
        else:
            loop.call_soon(self._commit_now)

    def _commit_now(self) -> None:
        """Queue an asynchronous commit (errors surface in the next synchronous ``commit``,
        which also covers what this one may miss): on the loop thread when the consumer
        thread is idle, else on the consumer's thread. Never beside a running consumer call:
        it waits while the consumer thread sits in ``poll`` (up to its 50 ms timeout,
        measured), which stalled every job's start by ~50 ms."""
        self._soon = False
        self._pacer.take(time.monotonic())
        if not self._busy:  # queued by librdkafka: does not wait for the broker
            self._commit_positions(self.consumer, asynchronous=True)
            return
        t = asyncio.ensure_future(
            self.call(self._commit_positions, self.consumer, asynchronous=True)
        )
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def commit(self) -> None:
        """A synchronous commit of everything finished (drain, exit)."""
        await self.call(self._commit_positions, self.consumer, asynchronous=False)

    async def committed_past(self, topic: str, partition: int, offset: int) -> bool:
        """Whether this worker's own commit of a partition that left it covers ``offset``:
        a commit can land without its answer arriving before the partition moved, and then
        no next owner reads the dispatch, so it runs here. A commit signed by another
        member (a next owner that may have run it) does not count: the monitor retries a
        start nobody runs."""
        try:
            parts = await self.call(
                self.consumer.committed, [TopicPartition(topic, partition)], timeout=5.0
            )
        except KafkaException as exc:
            log.warning("committed position of %s[%d] unknown: %s", topic, partition, exc)
            return False
        got = parts[0] if parts else None
        mine = (
            got is not None
            and got.error is None
            and got.offset > offset
            and got.metadata == self.id
        )
        if mine:
            log.warning(
                "%s[%d]@%d: the partition moved, but this worker's commit covers it: runs here",
                topic,
                partition,
                offset,
            )
        return mine

    def lag(self) -> int:
        """Messages behind the high watermark over this worker's partitions (consumer thread)."""
        assignment = self.consumer.assignment()
        if not assignment:
            return 0
        total = 0
        for tp in self.consumer.position(assignment):
            # cached: the high watermark the last fetch brought (no request per partition)
            _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if tp.offset >= 0 and high >= 0:
                total += max(0, high - tp.offset)
        return total

    async def close(self) -> None:
        await self.call(self.consumer.close)
        self._pool.shutdown(wait=False)
