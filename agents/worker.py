"""The worker: a member of the ``<app_id>.workers`` consumer group that runs dispatched jobs.

Workers keep no stream state, so they consume with confluent-kafka directly (batched).

Invariants:
- At most ``slots`` jobs run at once and at most ``slots`` more are buffered; beyond that the
  worker stops taking messages (backpressure) and, when full for long, pauses its partitions
  while it keeps serving rebalances. Free/total slots go out in heartbeats.
- An offset is committed only after the outcome of its job was confirmed by the broker
  (``OffsetTracker``), so a worker that dies mid-job leaves the dispatch to be redelivered.
- A dispatch for an attempt this process already ran is not run twice.
- SIGTERM drains: no new work, running jobs get ``drain_grace_s`` to finish, offsets are
  committed, exit 0. A second signal aborts: running jobs are stopped and handed back
  (their offsets stay uncommitted).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from confluent_kafka import Consumer, KafkaException, TopicPartition

from agents.context import Context, RawMessage, retrying
from agents.core.offsets import OffsetTracker
from agents.deadletter import dead_letter
from agents.runner import Outcome, run_attempt
from streams.errors import InvalidEvent
from streams.events import (
    Dispatch,
    JobFailed,
    JobStarted,
    JobSucceeded,
    WorkerHeartbeat,
    decode,
    encode,
)
from streams.kafka import Record, client_config

log = logging.getLogger("jobstream.worker")
PAUSE_AFTER_S = 2.0
HeartbeatState = Literal["running", "draining", "stopped"]


class Worker:
    def __init__(
        self, ctx: Context, *, slots: int | None = None, worker_id: str | None = None
    ) -> None:
        self.ctx = ctx
        s = ctx.settings
        self.slots = slots or s.worker_slots
        self.id = (
            worker_id
            or s.worker_id
            or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.host = socket.gethostname()
        self.tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
        self.running: dict[str, asyncio.Task[None]] = {}
        self.backlog: deque[RawMessage] = deque()
        self.seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.assigned = asyncio.Event()
        self.stopping = asyncio.Event()
        self.aborting = asyncio.Event()
        self.completed = 0
        self._paused = False
        self._full_since: float | None = None
        self._slot_freed = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kafka-consumer")
        cfg = client_config(s.require_kafka(), s.kafka_config)
        cfg.update(
            {
                "group.id": f"{s.app_id}.workers",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "client.id": self.id,
                "partition.assignment.strategy": "cooperative-sticky",
                "max.poll.interval.ms": 600_000,
                "fetch.wait.max.ms": 10,
            }
        )
        self.consumer = Consumer(cfg)

    # -- consumer calls run on one dedicated thread ----------------------------------

    async def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kw))

    @property
    def free(self) -> int:
        return self.slots - len(self.running)

    async def run(self) -> None:
        topic = self.ctx.topic("jobs.dispatch")
        loop = asyncio.get_running_loop()

        def on_assign(_consumer: Any, partitions: list[TopicPartition]) -> None:
            if partitions:
                loop.call_soon_threadsafe(self.assigned.set)

        await self._call(
            self.consumer.subscribe, [topic], on_assign=on_assign, on_revoke=self._on_revoke
        )
        beat = asyncio.create_task(self._heartbeats())
        try:
            while not self.stopping.is_set():
                room = self.slots - len(self.backlog)  # prefetch at most one round
                if room <= 0:
                    await self._when_full()
                    continue
                if self._paused:
                    await self._set_paused(False)
                self._full_since = None
                msgs = await self._call(self._fetch, room)
                for m in msgs:
                    if m.error():
                        log.warning("consumer error: %s", m.error())
                        continue
                    raw = RawMessage(m.topic(), m.partition(), m.offset(), m.key(), m.value())
                    self.tracker.started((raw.topic, raw.partition), raw.offset)
                    self.backlog.append(raw)
                self._start_backlog()
                await self._commit()
            await self._drain()
        finally:
            beat.cancel()
            await self._heartbeat("stopped")
            await self._commit()
            await self._call(self.consumer.close)
            self._pool.shutdown(wait=False)

    def _fetch(self, room: int) -> list[Any]:
        """Up to ``room`` messages, returning as soon as one is there. ``consume(n, timeout)``
        waits for all ``n`` or the whole timeout (librdkafka's batch call), which would add
        up to the timeout to every dispatch at light load; ``poll`` returns on the first."""
        first = self.consumer.poll(0.05)
        if first is None:
            return []
        return (
            [first, *self.consumer.consume(num_messages=room - 1, timeout=0)]
            if room > 1
            else [first]
        )

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        lost = {(tp.topic, tp.partition) for tp in partitions}
        for tp in lost:
            self.tracker.forget(tp)
        # buffered, unstarted dispatches of a revoked partition belong to its next owner
        self.backlog = deque(m for m in self.backlog if (m.topic, m.partition) not in lost)

    def _start_backlog(self) -> None:
        while self.backlog and self.free > 0:
            self._take(self.backlog.popleft())

    async def _when_full(self) -> None:
        """Slots and prefetch are full. librdkafka keeps fetched messages queued with its own
        backpressure, so the cheap path is to not consume. A resume costs ~0.8 s before
        messages flow again (measured), so pause only after ``PAUSE_AFTER_S`` of being
        full (long jobs); then keep polling so rebalances are still served."""
        now = time.monotonic()
        if self._full_since is None:
            self._full_since = now
        if not self._paused and now - self._full_since >= PAUSE_AFTER_S:
            await self._set_paused(True)
        if self._paused:
            await self._call(self.consumer.consume, num_messages=1, timeout=0.05)
        else:
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), 0.05)
            except TimeoutError:
                pass
        await self._commit()

    async def _set_paused(self, paused: bool) -> None:
        assignment = await self._call(self.consumer.assignment)
        if paused:
            await self._call(self.consumer.pause, assignment)
        else:
            await self._call(self.consumer.resume, assignment)
        self._paused = paused

    async def _commit(self) -> None:
        positions = self.tracker.commit_positions()
        if not positions:
            return
        offsets = [TopicPartition(t, p, off) for (t, p), off in positions.items()]
        try:
            await self._call(self.consumer.commit, offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("commit failed (will be retried with the next one): %s", exc)

    def _take(self, msg: RawMessage) -> None:
        tp = (msg.topic, msg.partition)
        try:
            d = decode(msg.value, Dispatch, max_bytes=self.ctx.settings.max_payload_bytes)
        except InvalidEvent as exc:
            task = asyncio.create_task(self._reject(msg, str(exc)))
            self.running[f"\x00bad:{msg.topic}:{msg.partition}:{msg.offset}"] = task
            return
        key = (d.job_id, d.attempt)
        if key in self.seen or d.job_id in self.running:
            self.tracker.finished(tp, msg.offset)
            return
        self.seen[key] = None
        while len(self.seen) > 100_000:
            self.seen.popitem(last=False)
        self.running[d.job_id] = asyncio.create_task(self._execute(msg, d))

    async def _reject(self, msg: RawMessage, reason: str) -> None:
        try:
            await dead_letter(self.ctx, [(msg, reason)])
        finally:
            self.running.pop(f"\x00bad:{msg.topic}:{msg.partition}:{msg.offset}", None)
            self.tracker.finished((msg.topic, msg.partition), msg.offset)

    def _event_record(self, d: Dispatch, event: Any) -> Record:
        return Record(self.ctx.topic("jobs.events"), encode(event), (d.group or d.job_id).encode())

    async def _execute(self, msg: RawMessage, d: Dispatch) -> None:
        s = self.ctx.settings
        produce = self.ctx.producer.aproduce
        try:
            started = JobStarted(job_id=d.job_id, attempt=d.attempt, worker=self.id, at=time.time())
            await retrying("publish started", lambda: produce([self._event_record(d, started)]))
            outcome: Outcome = await run_attempt(
                d,
                s.kinds.get(d.kind),
                log_dir=s.log_dir,
                kill_grace_s=s.kill_grace_s,
                cancel=self.aborting,
            )
            if self.aborting.is_set() and not outcome.ok:
                return  # handed back: the offset stays uncommitted, the dispatch returns
            at = time.time()
            event: JobSucceeded | JobFailed
            if outcome.ok:
                event = JobSucceeded(
                    job_id=d.job_id,
                    attempt=d.attempt,
                    worker=self.id,
                    at=at,
                    exit_code=0,
                    duration_s=outcome.duration_s,
                    log_path=outcome.log_path,
                )
            else:
                event = JobFailed(
                    job_id=d.job_id,
                    attempt=d.attempt,
                    worker=self.id,
                    at=at,
                    error=outcome.error[:4000],
                    exit_code=outcome.exit_code,
                    duration_s=outcome.duration_s,
                    log_path=outcome.log_path,
                    retryable=outcome.retryable,
                )
            await retrying("publish outcome", lambda: produce([self._event_record(d, event)]))
            self.tracker.finished((msg.topic, msg.partition), msg.offset)
            self.completed += 1
        finally:
            self.running.pop(d.job_id, None)
            self._start_backlog()
            self._slot_freed.set()

    async def _heartbeat(self, state: HeartbeatState = "running") -> None:
        beat = WorkerHeartbeat(
            worker=self.id,
            host=self.host,
            slots_total=self.slots,
            slots_free=max(0, self.free),
            running=sorted(k for k in self.running if not k.startswith("\x00")),
            at=time.time(),
            state=state,
        )
        rec = Record(self.ctx.topic("workers.heartbeat"), encode(beat), self.id.encode())
        try:
            await self.ctx.producer.aproduce([rec], timeout_s=5.0)
        except Exception as exc:  # a missed heartbeat is not fatal; the next one follows
            log.warning("heartbeat not sent: %s", exc)

    async def _heartbeats(self) -> None:
        while True:
            state: HeartbeatState = "draining" if self.stopping.is_set() else "running"
            await self._heartbeat(state)
            await asyncio.sleep(self.ctx.settings.heartbeat_interval_s)

    async def _drain(self) -> None:
        if not self.running:
            return
        log.warning(
            "draining: waiting up to %.0f s for %d running jobs",
            self.ctx.settings.drain_grace_s,
            len(self.running),
        )
        deadline = time.monotonic() + self.ctx.settings.drain_grace_s
        while self.running and time.monotonic() < deadline and not self.aborting.is_set():
            await asyncio.wait(list(self.running.values()), timeout=0.2)
            await self._commit()
        if self.running:
            self.aborting.set()
            await asyncio.wait(list(self.running.values()), timeout=30)

    def request_stop(self, abort: bool = False) -> None:
        if abort or self.stopping.is_set():
            self.aborting.set()
        self.stopping.set()


async def run_worker(ctx: Context, *, slots: int | None = None, abort: bool = False) -> int:
    """Run a worker until SIGTERM/SIGINT; return the process exit code."""
    worker = Worker(ctx, slots=slots)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop, abort)
    try:
        await worker.run()
    finally:
        await ctx.close()
    return 0
