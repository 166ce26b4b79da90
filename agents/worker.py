"""The worker: a member of the ``<app_id>.workers`` consumer group that runs dispatched jobs.

Workers keep no stream state, so they consume with confluent-kafka directly (batched).

Invariants:
- At most ``slots`` jobs run at once. Dispatches that arrive while all slots are busy are
  buffered and start earliest-due first (admission's due time; in offset order within a
  partition); admission's capacity bounds how many can be outstanding, and past
  ``BUFFER_ROUNDS`` × slots buffered the worker pauses its partitions while it keeps
  serving rebalances. Free/total slots go out in heartbeats.
- Kafka owns a dispatch until its job's start is on the broker, the heartbeat monitor
  after: an offset is committed (``OffsetTracker``) once the broker confirmed the job's
  ``job.started`` event (or the dispatch was skipped or dead-lettered); the job runs once
  that confirmation is in. A worker that dies between the start and the commit has the
  dispatch redelivered to another worker (run again as the same attempt: completion stays
  single by attempt); one that dies after falls silent, and the
  monitor (``agents.monitor``) retries its running jobs as a new attempt. A late report from
  the old attempt is fenced off by the attempt number.
- Outcome events and offset commits are paced (``agents.core.pacing``): at once under
  light load, batched at ``worker_sends_per_s`` under load; starts have their own, faster
  pacer (``worker_start_sends_per_s``, a burst of one per slot: its slot waits for it). Each
  job waits for its own record's confirmation (``agents.outbox``). A slot is held until the
  job's process ends, not until its outcome is confirmed.
- Every per-job memory is per attempt (job id, attempt): a dispatch for an attempt this
  process already ran is not run twice; an attempt cancelled on ``jobs.control`` (a cancel
  names its attempt: the control agent resolves an operator's cancel) is not started, and is
  stopped when running; either way its end is reported (a failure that the cancel already in
  PostgreSQL fences off, which gives back the attempt's holds); a later attempt of the same
  job runs. A newer attempt of a job whose older
  attempt still runs here stops the older one (the job moved on) and runs; an older one is
  skipped.
- Every attempt whose start is confirmed ends with a report: an error of the worker's own
  after the start (the log cannot be written, a pool member cannot be made) is that
  attempt's retryable failure. A dispatch the worker cannot run (over the size limit,
  unreadable) is dead-lettered and, when it names its attempt, fails that attempt. A
  worker whose loop fails hands its running jobs back before its ``stopped`` heartbeat.
- ``pause``/``resume`` of a job on ``jobs.control`` stop and continue its process group
  (SIGSTOP/SIGCONT); paused time does not count against the timeout.
- SIGTERM drains: no new work, running jobs get ``drain_grace_s`` to finish (``nokill``
  kinds as long as they need), offsets are committed, exit 0. After the grace, or on a
  second signal or ``--abort``, running jobs are stopped and handed back: ``job.failed``
  with ``counts=False``, so the attempt is retried at once elsewhere and not counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from agents.commits import CommitWaits
from agents.context import Context, RawMessage
from agents.core.offsets import OffsetTracker, next_to_start
from agents.core.pacing import Pacer
from agents.deadletter import dead_letter
from agents.heap import freeze_once_assigned, freeze_startup_heap
from agents.outbox import Outbox
from agents.pools import ensure_pool_topics, heartbeat_partition, pools_served, worker_labels
from agents.pypool import PyPool
from agents.runner import AttemptHandle, Outcome, file_safe, run_attempt
from streams.errors import InvalidEvent
from streams.events import (
    Control,
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
BUFFER_ROUNDS = 4  # buffered dispatches beyond which a full worker pauses its partitions
CONTROL_LOOKBACK_S = 60.0  # a cancel sent just before this worker started still counts
CANCELLED_MEMORY = 100_000
# a dispatch carries a job intake bounded by ``max_payload_bytes`` plus admission's fields
DISPATCH_ALLOWANCE = 16 * 1024
HeartbeatState = Literal["running", "draining", "stopped"]
Attempt = tuple[
    str, int
]  # (job id, attempt); a rejected dispatch: ("\x00bad:topic:partition", offset)
# how a worker consumes ``jobs.dispatch`` (also the floor's bare loop, bench/floor.py):
# offsets committed by the worker once a start is confirmed, partitions moved one at a time,
# and a fetch answered within 10 ms when nothing is there
DISPATCH_CONSUMER: dict[str, Any] = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    "fetch.wait.max.ms": 10,
}


class _DispatchId(msgspec.Struct, frozen=True):
    """The attempt a dispatch names, read leniently from one the worker cannot run (over
    the size limit, a field it does not know): that attempt fails with the reason instead
    of staying ``dispatched`` with its holds."""

    job_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    group: str | None = None


class _Buffered:
    """A dispatch waiting for a slot: where it came from, decoded once on arrival (or why it
    cannot be), and admission's due time (the start order; unreadable: last)."""

    __slots__ = (
        "topic",
        "partition",
        "offset",
        "key",
        "value",
        "dispatch",
        "error",
        "named",
        "due",
    )

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        max_bytes: int,
    ) -> None:
        self.topic, self.partition, self.offset, self.key, self.value = (
            topic,
            partition,
            offset,
            key,
            value,
        )
        self.dispatch: Dispatch | None = None
        self.error = ""
        self.named: _DispatchId | None = None  # unreadable: which attempt it was, if known
        try:
            self.dispatch = decode(value, Dispatch, max_bytes=max_bytes)
        except InvalidEvent as exc:  # ``_take`` dead-letters it with this reason
            self.error = str(exc)
            try:
                self.named = msgspec.json.decode(value or b"", type=_DispatchId)
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
        self.due = float("inf") if self.dispatch is None else self.dispatch.due or float("inf")

    def raw(self) -> RawMessage:
        return RawMessage(self.topic, self.partition, self.offset, self.key, self.value)


def _settle(fut: asyncio.Future[bool] | None, value: bool) -> None:
    if fut is not None and not fut.done():
        fut.set_result(value)


class Worker:
    def __init__(
        self,
        ctx: Context,
        *,
        slots: int | None = None,
        worker_id: str | None = None,
        labels: list[str] | None = None,
    ) -> None:
        self.ctx = ctx
        ctx.process = "worker"
        s = ctx.settings
        self.slots = slots or s.worker_slots
        self.id = (
            worker_id
            or s.worker_id
            or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.host = socket.gethostname()
        self.labels = worker_labels(s, labels)
        self.since = time.time()
        # per attempt: a job's attempts are different runs (a cancel, a pause, a fence aims
        # at one of them), and one job has at most one attempt here (``attempt_of``)
        self.handles: dict[Attempt, AttemptHandle] = {}
        self.kinds_of: dict[Attempt, str] = {}
        self.attempt_of: dict[str, int] = {}
        self.cancelled: OrderedDict[Attempt, str] = OrderedDict()
        self.paused_jobs: OrderedDict[str, None] = OrderedDict()  # until resumed
        self.handed_back = 0
        self.pypool = PyPool(self.slots)
        self._fetch_at = max(1, self.slots // 2)  # room in the buffer that triggers a fetch
        self._events_topic = ctx.topic("jobs.events")
        # running jobs' progress files, swept once per heartbeat (``_sweep_progress``)
        self.progress_dir = Path(s.log_dir) / ".progress" / file_safe(self.id)[:120]
        self.tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
        self.running: dict[Attempt, asyncio.Task[None]] = {}
        self._publishing = 0  # jobs in ``running`` whose process ended: only reporting left
        # job events and offset commits go out batched by load (agents.core.pacing)
        burst = max(1.0, s.worker_sends_per_s / 10)
        self.events = Outbox(ctx.producer, Pacer(s.worker_sends_per_s, burst))
        # starts: at once while the job rate is below ``worker_start_sends_per_s``, then
        # the starts of one short interval share a request (a slot waits at most that long)
        self.starts = Outbox(ctx.producer, Pacer(s.worker_start_sends_per_s, float(self.slots)))
        self._commit_pacer = Pacer(s.worker_sends_per_s, burst)
        self.backlog: deque[_Buffered] = deque()
        self.seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.assigned = asyncio.Event()
        self.owned: frozenset[tuple[str, int]] = frozenset()  # dispatch partitions held now
        self.stopping = asyncio.Event()
        self.aborting = asyncio.Event()
        self.completed = 0
        self._paused = False
        self._slot_waiter: asyncio.Future[bool] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self.commits = CommitWaits()  # dispatches of shared-resource jobs wait for their commit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kafka-consumer")
        self._consumer_busy = 0  # consumer calls on their way in ``_pool``
        cfg = client_config(s.require_kafka(), s.kafka_config)
        session_ms = int(min(1_800_000, max(6_000, s.worker_lost_after_s * 1000)))  # broker bounds
        cfg.update(
            {
                **DISPATCH_CONSUMER,
                "group.id": f"{s.app_id}.workers",
                "client.id": self.id,
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
        ctl = client_config(s.require_kafka(), s.kafka_config)
        ctl.update(
            {
                "group.id": f"{s.app_id}.worker-control.{self.id}",  # never commits: assign()
                "enable.auto.commit": False,
                "client.id": f"{self.id}-control",
                "fetch.wait.max.ms": 100,
            }
        )
        self.control = Consumer(ctl)
        self._control_pool = ThreadPoolExecutor(1, thread_name_prefix="kafka-control")

    # -- consumer calls run on one dedicated thread ----------------------------------

    async def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        self._consumer_busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: fn(*args, **kw)
            )
        finally:
            self._consumer_busy -= 1

    def _ready_messages(self, room: int) -> list[Any]:
        """What librdkafka already holds, taken on the loop thread without waiting, when the
        consumer thread is idle (a call beside a running ``poll`` would wait for it). Under
        load this is nearly every fetch, and it spares a thread hand-off per fetch."""
        if self._consumer_busy:
            return []
        return self.consumer.consume(num_messages=room, timeout=0)

    @property
    def free(self) -> int:
        """Slots not running a process (a job whose process ended while its outcome is being
        reported does not hold one)."""
        return self.slots - len(self.running) + self._publishing

    def topics(self) -> list[str]:
        """``jobs.dispatch`` and the dispatch topic of every pool this worker serves."""
        base = self.ctx.topic("jobs.dispatch")
        return [
            base,
            *(f"{base}.{p}" for p in sorted(pools_served(self.ctx.settings, self.labels))),
        ]

    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        s = self.ctx.settings
        pools = pools_served(s, self.labels)
        await ensure_pool_topics(s, self.ctx.registry, pools, set())
        self.progress_dir.mkdir(parents=True, exist_ok=True)

        def on_assign(_consumer: Any, partitions: list[TopicPartition]) -> None:
            log.info("assigned %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
            # incremental (cooperative); replaced, never changed in place: the heartbeat
            # reads it on the loop thread while a consumer callback may run on another
            self.owned = self.owned | {(tp.topic, tp.partition) for tp in partitions}
            if partitions:
                loop.call_soon_threadsafe(self.assigned.set)

        await self._call(
            self.consumer.subscribe,
            self.topics(),
            on_assign=on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        await self._assign_control()
        beat = asyncio.create_task(self._heartbeats())
        controls = asyncio.create_task(self._controls())
        clean = False
        try:
            while not self.stopping.is_set():
                # prefetch at most one round, and fetch once half a round has room (one
                # consumer call per several jobs under load, at once when idle)
                room = self.slots - len(self.backlog)
                if room < self._fetch_at:
                    await self._when_full()
                    continue
                if self._paused:
                    await self._set_paused(False)
                self._buffer(self._ready_messages(room) or await self._call(self._fetch, room))
                self._start_backlog()
                # commits: paced, after starts (``_commit_soon_as_paced``); synchronous only
                # on revoke, drain and exit
            await self._drain()
            clean = True
        finally:
            if not clean:  # the loop raised: its jobs are handed back, not left unreported
                await self._hand_back_all()
            beat.cancel()
            controls.cancel()
            await self.pypool.close()
            await self.starts.close()
            await self.events.close()
            await self._heartbeat("stopped")
            await self._commit()
            await self._call(self.consumer.close)
            await asyncio.get_running_loop().run_in_executor(self._control_pool, self.control.close)
            self._pool.shutdown(wait=False)
            self._control_pool.shutdown(wait=False)
            shutil.rmtree(self.progress_dir, ignore_errors=True)

    def _buffer(self, msgs: list[Any]) -> None:
        max_bytes = self.ctx.settings.max_payload_bytes + DISPATCH_ALLOWANCE
        tracing = self.ctx.tracer.on
        for m in msgs:
            if m.error():
                log.warning("consumer error: %s", m.error())
                continue
            raw = _Buffered(m.topic(), m.partition(), m.offset(), m.key(), m.value(), max_bytes)
            self.tracker.started((raw.topic, raw.partition), raw.offset)
            d = raw.dispatch
            if d is not None and d.attempt > 1:  # rare: a retry, or a handed-back dispatch
                self._supersede_buffered(d)
            self.backlog.append(raw)
            if tracing:
                self.ctx.tracer.mark("fetched", (raw.key or b"-").decode(errors="replace"))

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

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
        # commit what started here before the partitions move (the coordinator is there:
        # a revoke is a rebalance it runs; one round trip on whichever thread consumed)
        self._commit_sync(consumer)
        self._drop_partitions(partitions)

    def _on_loop(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the event loop's thread (callbacks come from whichever thread
        called the consumer), in the order of the calls."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        """The group went on without this member (its session timed out, e.g. the broker
        was away): the partitions may be owned elsewhere already, so nothing is committed
        (a synchronous commit would wait for a coordinator that is not there, and block the
        event loop when the loop thread consumed). What started here and was not committed
        is redelivered to the next owner and fenced by attempt."""
        log.warning(
            "lost %s (session timed out)", [f"{tp.topic}[{tp.partition}]" for tp in partitions]
        )
        self._drop_partitions(partitions)

    def _drop_partitions(self, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.owned = self.owned - gone
        self._on_loop(self.commits.abandon, gone)  # after the revoke's commit is noted
        for tp in gone:
            self.tracker.forget(tp)
        # buffered, unstarted dispatches of a partition that moved belong to its next owner
        self.backlog = deque(m for m in self.backlog if (m.topic, m.partition) not in gone)

    def _start_backlog(self) -> None:
        """Start buffered dispatches while slots are free, earliest due first across
        partitions (an urgent job admitted after others already buffered here does not wait
        behind them). Per partition, started ones always precede buffered ones, so the
        committable position never skips a started dispatch: whatever is redelivered after a
        stop or rebalance never started here."""
        if self.stopping.is_set():
            return  # draining: no new work; the buffered dispatches go to the next owner
        while self.backlog and self.free > 0:
            i = next_to_start([((m.topic, m.partition), m.due) for m in self.backlog])
            msg = self.backlog[i]
            del self.backlog[i]
            self._take(msg)

    async def _when_full(self) -> None:
        """Every slot is busy and (at least half) a round is buffered. Wait a moment for a
        slot; if none frees, keep consuming (the group keeps this member and rebalances are
        served) and buffer what arrives: admission's capacity (``capacity_factor`` × the
        slots of all workers) bounds what can be outstanding, and the buffer starts
        earliest-due first, so an urgent dispatch that lands here waits for the next free
        slot only. Pausing costs ~0.8 s before messages flow again after the resume
        (measured), so the partitions are paused only when the buffer reaches
        ``BUFFER_ROUNDS`` × slots (a capacity factor beyond what one worker should hold)."""
        if await self._slot_freed_within(0.05) or self.free > 0:
            return  # the main loop tops the buffer up
        limit = BUFFER_ROUNDS * self.slots
        if len(self.backlog) >= limit and not self._paused:
            await self._set_paused(True)
        elif len(self.backlog) < limit and self._paused:
            await self._set_paused(False)
        # partitions assigned by a rebalance while paused are not paused: what they deliver
        # is buffered like the rest (never dropped)
        self._buffer(await self._call(self.consumer.consume, max(1, limit - len(self.backlog)), 0))

    async def _slot_freed_within(self, timeout_s: float) -> bool:
        """Wait until a job frees its slot, at most ``timeout_s``: True when one did."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._slot_waiter = fut
        timer = loop.call_later(timeout_s, _settle, fut, False)
        try:
            return await fut
        finally:
            timer.cancel()
            self._slot_waiter = None

    async def _set_paused(self, paused: bool) -> None:
        assignment = await self._call(self.consumer.assignment)
        if paused:
            await self._call(self.consumer.pause, assignment)
        else:
            await self._call(self.consumer.resume, assignment)
        self._paused = paused

    _commit_soon = False
    _recommit = False  # an asynchronous commit failed: the next one sends every position

    def _on_commit(self, err: Any, partitions: Any) -> None:
        """The broker's answer to an asynchronous commit (consumer thread)."""
        if err is not None:
            log.warning("commit failed (the next one resends every position): %s", err)
            self._recommit = True
            self._on_loop(self._commit_soon_as_paced)  # dispatches may wait for it
            return
        self._note_committed(partitions or [])

    def _note_committed(self, partitions: list[TopicPartition]) -> None:
        done = [
            ((tp.topic, tp.partition), tp.offset)
            for tp in partitions
            if tp.error is None and tp.offset >= 0
        ]
        if done:
            self._on_loop(self.commits.committed, done)

    def _commit_positions(self, consumer: Any, *, asynchronous: bool) -> None:
        """Commit what the tracker allows (a failed commit is retried by the next one)."""
        recommit, self._recommit = self._recommit, False
        positions = self.tracker.commit_positions(everything=recommit)
        if not positions:
            return
        # signed with this worker's id: ``_committed_past`` tells its own commit from a
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

    def _commit_sync(self, consumer: Any) -> None:
        self._commit_positions(consumer, asynchronous=False)

    def _commit_soon_as_paced(self) -> None:
        """One commit for every start until it goes: at once while the pacer has tokens,
        else when it has one again (a commit request costs what a produce does)."""
        if self._commit_soon:
            return
        self._commit_soon = True
        loop = asyncio.get_running_loop()
        wait = self._commit_pacer.wait(time.monotonic())
        if wait > 0:
            loop.call_later(wait, self._commit_now)
        else:
            loop.call_soon(self._commit_now)

    def _commit_now(self) -> None:
        """Queue an asynchronous commit (errors surface in the next synchronous ``_commit``,
        which also covers what this one may miss): on the loop thread when the consumer
        thread is idle, else on the consumer's thread. Never beside a running consumer call:
        it waits while the consumer thread sits in ``poll`` (up to its 50 ms timeout,
        measured), which stalled every job's start by ~50 ms."""
        self._commit_soon = False
        self._commit_pacer.take(time.monotonic())
        if not self._consumer_busy:  # queued by librdkafka: does not wait for the broker
            self._commit_positions(self.consumer, asynchronous=True)
            return
        self._background.add(
            t := asyncio.ensure_future(
                self._call(self._commit_positions, self.consumer, asynchronous=True)
            )
        )
        t.add_done_callback(self._background.discard)

    async def _commit(self) -> None:
        await self._call(self._commit_sync, self.consumer)

    def _take(self, msg: _Buffered) -> None:
        tp = (msg.topic, msg.partition)
        d = msg.dispatch
        if d is None:
            bad = (f"\x00bad:{msg.topic}:{msg.partition}", msg.offset)
            self.running[bad] = asyncio.create_task(
                self._reject(msg.raw(), msg.error, bad, msg.named)
            )
            return
        key = (d.job_id, d.attempt)
        here = self.attempt_of.get(d.job_id)
        if key in self.seen or key in self.cancelled or (here is not None and here > d.attempt):
            # run here already, cancelled, or superseded by the attempt running here
            if key in self.cancelled and key not in self.seen:
                self._report_unstarted(d)
            self.tracker.finished(tp, msg.offset)
            self._commit_soon_as_paced()
            return
        if here is not None:
            # an older attempt of this job still runs here (e.g. a redelivered dispatch run
            # again after a worker died before its commit, then the monitor's retry): the
            # job moved on, so the old run is stopped (its report would be fenced off) and
            # the new attempt runs
            self._supersede((d.job_id, here), d.attempt)
        self.seen[key] = None
        waited = time.time() - d.dispatched_at
        if waited > 1.0:
            log.info(
                "job %s attempt %d reached this worker %.1f s after dispatch (%s[%d]@%d)",
                d.job_id,
                d.attempt,
                waited,
                msg.topic,
                msg.partition,
                msg.offset,
            )
        while len(self.seen) > 100_000:
            self.seen.popitem(last=False)
        self.handles[key] = handle = AttemptHandle()
        if d.job_id in self.paused_jobs:
            handle.pause()  # paused before it got here: its process starts stopped
        self.kinds_of[key] = d.kind
        self.attempt_of[d.job_id] = d.attempt
        self.running[key] = asyncio.create_task(self._execute(msg, d))

    def _failure_record(self, job_id: str, attempt: int, group: str | None, error: str) -> Record:
        """A non-retryable failure of one attempt (what a cancelled, superseded or unrunnable
        attempt reports: fenced off when the job moved on, it gives back the attempt's holds)."""
        event = JobFailed(
            job_id=job_id,
            attempt=attempt,
            worker=self.id,
            at=time.time(),
            error=error[:4000],
            retryable=False,
        )
        return Record(self._events_topic, encode(event), (group or job_id).encode())

    def _ended_record(self, d: Dispatch, why: str) -> Record:
        """The end of an attempt that was cancelled or superseded."""
        error = f"cancelled: {why}" if why else "cancelled"
        return self._failure_record(d.job_id, d.attempt, d.group, error)

    def _report_unstarted(self, d: Dispatch) -> None:
        """A cancelled attempt's dispatch, dropped here before it started: say it is over
        (in the background; nothing waits for it)."""
        record = self._ended_record(d, self.cancelled.get((d.job_id, d.attempt), ""))
        task = asyncio.ensure_future(self.events.deliver(record, "publish outcome"))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _committed_past(self, topic: str, partition: int, offset: int) -> bool:
        """Whether this worker's own commit of a partition that left it covers ``offset``:
        a commit can land without its answer arriving before the partition moved, and then
        no next owner reads the dispatch, so it runs here. A commit signed by another
        member (a next owner that may have run it) does not count: the monitor retries a
        start nobody runs."""
        try:
            parts = await self._call(
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

    def _supersede_buffered(self, d: Dispatch) -> None:
        """Older attempts of ``d``'s job still buffered here (e.g. a dispatch handed back
        after its partition had no live owner, read with its successor once it has one)
        are dropped unstarted when their turn comes, not started and stopped."""
        for m in self.backlog:
            old = m.dispatch
            if old is not None and old.job_id == d.job_id and old.attempt < d.attempt:
                self._remember_cancel(
                    (old.job_id, old.attempt), f"superseded by attempt {d.attempt}"
                )

    def _supersede(self, old: Attempt, attempt: int) -> None:
        self._remember_cancel(old, f"superseded by attempt {attempt}")
        handle = self.handles.get(old)
        if handle is not None:
            log.warning("job %s attempt %d superseded by attempt %d: stopped", *old, attempt)
            handle.cancel(f"superseded by attempt {attempt}")

    def _remember_cancel(self, key: Attempt, reason: str) -> None:
        self.cancelled[key] = reason
        while len(self.cancelled) > CANCELLED_MEMORY:
            self.cancelled.popitem(last=False)

    async def _reject(
        self, msg: RawMessage, reason: str, key: Attempt, named: _DispatchId | None
    ) -> None:
        try:
            await dead_letter(self.ctx, [(msg, reason)])
            if named is not None:
                error = f"the worker cannot run this dispatch: {reason}"
                record = self._failure_record(named.job_id, named.attempt, named.group, error)
                await self.events.deliver(record, "publish outcome")
        finally:
            self.running.pop(key, None)
            self.tracker.finished((msg.topic, msg.partition), msg.offset)
            self._commit_soon_as_paced()

    def _event_record(self, d: Dispatch, event: Any) -> Record:
        return Record(self._events_topic, encode(event), (d.group or d.job_id).encode())

    async def _execute(self, msg: _Buffered, d: Dispatch) -> None:
        s = self.ctx.settings
        deliver = self.events.deliver
        key = (d.job_id, d.attempt)
        handle = self.handles[key]
        publishing = False
        started = JobStarted(job_id=d.job_id, attempt=d.attempt, worker=self.id, at=time.time())
        # once the start is confirmed the heartbeat monitor owns the attempt and the
        # dispatch's offset is committed (``_start_confirmed``); the job runs after that. A
        # worker killed before the commit has its dispatch redelivered and run again, and
        # only the attempt number keeps the second run from completing the job twice.
        # (Running the job while its start is on its way doubled a flooded worker's
        # throughput but lengthened the light-load unlock path in every A/B: see
        # docs/performance.md, session 6.)
        tracer = self.ctx.tracer
        if tracer.on:
            tracer.mark("started", d.job_id, at=started.at)
        # a slot waits on it: its own pacer, far faster than the outcomes' and commits'
        confirm = self.starts.deliver(self._event_record(d, started), "publish started")
        confirm.add_done_callback(
            partial(self._start_confirmed, (msg.topic, msg.partition), msg.offset)
        )
        try:
            await confirm
            if (
                d.shared
                and not await self.commits.wait((msg.topic, msg.partition), msg.offset)
                and not await self._committed_past(msg.topic, msg.partition, msg.offset)
            ):
                # the partition moved before the dispatch was committed: its next owner
                # runs this attempt (a second run here would share nothing it holds)
                log.warning(
                    "job %s attempt %d: its partition moved before its commit; not run here",
                    *key,
                )
                self.seen.pop(key, None)  # redelivered here later, it runs
                self._finished_metrics(d, Outcome(False, None, "", 0.0, None, True), "moved")
                return
            m = self.ctx.metrics
            if m.enabled:
                tags = {"kind": d.kind, "tenant": d.tenant}
                m.observe("start_latency_ms", max(0.0, (started.at - d.submitted_at) * 1000), tags)
                m.observe("dispatch_to_start_ms", max(0.0, (started.at - d.dispatched_at) * 1000))
            try:
                outcome: Outcome = await run_attempt(
                    d,
                    s.kinds.get(d.kind),
                    log_dir=s.log_dir,
                    kill_grace_s=s.kill_grace_s,
                    handle=handle,
                    pool=self.pypool,
                    progress_dir=self.progress_dir,
                )
            except Exception as exc:
                # the start is on the broker: whatever went wrong here, the attempt must end
                # with a report, or it stays ``running`` while this worker lives on
                log.exception("job %s attempt %d: the worker could not run it", *key)
                outcome = Outcome(
                    False, None, f"worker {self.id} could not run the job: {exc!r}", 0.0, None, True
                )
            if key in self.cancelled and not outcome.ok:
                # cancelled or superseded: the job's state moved on in PostgreSQL already;
                # the report (fenced off there) says the attempt's process is over, so what
                # it holds is given back
                self._finished_metrics(d, outcome, "cancelled")
                await deliver(self._ended_record(d, self.cancelled[key]), "publish outcome")
                return
            # the process is done: its slot is free while the outcome is reported
            publishing = True
            self._publishing += 1
            self._slot_done()
            handed_back = self.aborting.is_set() and not outcome.ok
            event = self._outcome_event(d, outcome, handed_back=handed_back)
            if tracer.on:
                tracer.mark("finished", d.job_id, at=event.at)
            await deliver(self._event_record(d, event), "publish outcome")
            if tracer.on:
                tracer.mark("outcome_confirmed", d.job_id)
            self.completed += 1
            result = "succeeded" if outcome.ok else "handed_back" if handed_back else "failed"
            self._finished_metrics(d, outcome, result)
        finally:
            if not confirm.done() and not publishing:
                confirm.cancel()  # stopped before the job ran to its end (an abort)
            if publishing:
                self._publishing -= 1
            self.running.pop(key, None)
            self.handles.pop(key, None)
            self.kinds_of.pop(key, None)
            if self.attempt_of.get(d.job_id) == d.attempt:
                del self.attempt_of[d.job_id]
            if not publishing:
                self._slot_done()

    def _start_confirmed(
        self, tp: tuple[str, int], offset: int, confirm: asyncio.Future[Any]
    ) -> None:
        """The start reached the broker (or its send was given up): the dispatch is done for
        Kafka; commit soon (paced)."""
        self.tracker.finished(tp, offset)
        self._commit_soon_as_paced()
        if not confirm.cancelled():
            confirm.exception()  # retrieved: the outcome path reports it

    def _slot_done(self) -> None:
        self._start_backlog()
        _settle(self._slot_waiter, True)

    def _finished_metrics(self, d: Dispatch, outcome: Outcome, result: str) -> None:
        m = self.ctx.metrics
        m.count("jobs_finished", {"kind": d.kind, "result": result})
        m.observe("run_ms", outcome.duration_s * 1000, {"kind": d.kind})

    def _outcome_event(
        self, d: Dispatch, outcome: Outcome, *, handed_back: bool
    ) -> JobSucceeded | JobFailed:
        at = time.time()
        if outcome.ok:
            return JobSucceeded(
                job_id=d.job_id,
                attempt=d.attempt,
                worker=self.id,
                at=at,
                exit_code=0,
                duration_s=outcome.duration_s,
                log_path=outcome.log_path,
            )
        if handed_back:
            self.handed_back += 1
        error = (
            f"handed back: worker {self.id} stopped before the job ended"
            if handed_back
            else outcome.error
        )
        return JobFailed(
            job_id=d.job_id,
            attempt=d.attempt,
            worker=self.id,
            at=at,
            error=error[:4000],
            exit_code=outcome.exit_code,
            duration_s=outcome.duration_s,
            log_path=outcome.log_path,
            # a hand-back is not the job's failure: retried at once and not counted
            retryable=outcome.retryable or handed_back,
            backoff=not handed_back,
            counts=not handed_back,
        )

    # -- operator controls: cancel, pause, resume of jobs this worker holds ----------------

    async def _assign_control(self) -> None:
        """Read ``jobs.control`` from a minute ago on (no group membership, no commits)."""
        topic = self.ctx.topic("jobs.control")
        n = self.ctx.registry["jobs.control"].partitions
        since_ms = int((time.time() - CONTROL_LOOKBACK_S) * 1000)
        loop = asyncio.get_running_loop()

        def assign() -> None:
            tps = [TopicPartition(topic, p, since_ms) for p in range(n)]
            try:
                found = self.control.offsets_for_times(tps, timeout=10)
            except KafkaException as exc:
                log.warning("control topic offsets: %s; reading from its end", exc)
                found = [TopicPartition(topic, p, OFFSET_END) for p in range(n)]
            self.control.assign(
                [
                    TopicPartition(t.topic, t.partition, t.offset if t.offset >= 0 else OFFSET_END)
                    for t in found
                ]
            )

        await loop.run_in_executor(self._control_pool, assign)
        await loop.run_in_executor(self._control_pool, self._catch_up_control, topic, n)

    def _catch_up_control(self, topic: str, partitions: int, limit_s: float = 10.0) -> None:
        """Apply the last minute of ``jobs.control`` before any dispatch runs here: a cancel
        sent before this worker started must be known before its dispatch arrives (the two
        consumers move independently). Bounded: a control topic that cannot be read does not
        keep the worker from working."""
        deadline = time.monotonic() + limit_s
        try:
            ends = {
                p: self.control.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
                for p in range(partitions)
            }
        except KafkaException as exc:
            log.warning("control topic watermarks: %s; not caught up", exc)
            return
        max_bytes = self.ctx.settings.max_payload_bytes
        while time.monotonic() < deadline:
            for m in self.control.consume(num_messages=500, timeout=0.2):
                if m.error():
                    continue
                try:
                    cmd = decode(m.value(), Control, max_bytes=max_bytes)
                except InvalidEvent:
                    continue
                self._on_loop(self.apply_control, cmd)
            positions = self.control.position([TopicPartition(topic, p) for p in range(partitions)])
            if all(tp.offset >= ends[tp.partition] or ends[tp.partition] <= 0 for tp in positions):
                return
        log.warning("control topic not caught up within %.0f s", limit_s)

    async def _controls(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                msgs = await loop.run_in_executor(
                    self._control_pool, lambda: self.control.consume(num_messages=100, timeout=0.2)
                )
            except Exception as exc:  # a control hiccup must not stop the jobs
                log.warning("control consumer: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for m in msgs:
                if m.error():
                    continue
                try:
                    cmd = decode(m.value(), Control, max_bytes=self.ctx.settings.max_payload_bytes)
                except InvalidEvent:
                    continue  # the control agent dead-letters it; here it just does nothing
                self.apply_control(cmd)

    def apply_control(self, cmd: Control) -> None:
        """Cancel one attempt (only a cancel that names it: the control agent resolves an
        operator's cancel to the attempt then in flight), pause or resume the attempt of a
        job that runs here."""
        if cmd.scope != "job" or not cmd.name:
            return
        job = cmd.name
        if cmd.action == "cancel":
            if cmd.attempt is None:
                return
            key = (job, cmd.attempt)
            self._remember_cancel(key, cmd.reason)
            self.backlog = deque(m for m in self.backlog if not self._is_dispatch_of(m, key))
            handle = self.handles.get(key)
            if handle is not None:
                log.warning("cancelling job %s attempt %d: %s", *key, cmd.reason or "no reason")
                handle.cancel(f"cancelled: {cmd.reason}" if cmd.reason else "cancelled")
            return
        if cmd.action == "pause":  # also for a dispatch still buffered here (started paused)
            self.paused_jobs[job] = None
            while len(self.paused_jobs) > CANCELLED_MEMORY:
                self.paused_jobs.popitem(last=False)
        elif cmd.action == "resume":
            self.paused_jobs.pop(job, None)
        here = self.attempt_of.get(job)
        if here is None or (cmd.attempt is not None and cmd.attempt != here):
            return
        handle = self.handles.get((job, here))
        if handle is None:
            return
        if cmd.action == "pause":
            if handle.pause():
                log.warning("paused job %s (SIGSTOP)", job)
        elif cmd.action == "resume":
            if handle.resume():
                log.warning("resumed job %s (SIGCONT)", job)

    def _is_dispatch_of(self, m: _Buffered, key: Attempt) -> bool:
        d = m.dispatch
        if d is None or (d.job_id, d.attempt) != key:
            return False
        self.tracker.finished((m.topic, m.partition), m.offset)
        self._report_unstarted(d)
        return True

    def _sweep_progress(self) -> None:
        """Remove progress files of attempts no longer running here (one directory scan
        per heartbeat instead of an unlink per job)."""
        live = {os.path.basename(h.progress_path) for h in self.handles.values() if h.progress_path}
        try:
            with os.scandir(self.progress_dir) as entries:
                for entry in entries:
                    if entry.name not in live:
                        try:
                            os.unlink(entry.path)
                        except FileNotFoundError:
                            pass
        except FileNotFoundError:
            self.progress_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # never a reason to miss a beat
            log.warning("progress files: %s", exc)

    async def _heartbeat(self, state: HeartbeatState = "running") -> None:
        self._sweep_progress()
        progress = {}
        for (job, _), h in list(self.handles.items()):
            value = h.progress()
            if value is not None:
                progress[job] = value
        beat = WorkerHeartbeat(
            worker=self.id,
            host=self.host,
            slots_total=self.slots,
            slots_free=max(0, self.free),
            running=sorted(job for job, _ in self.running if not job.startswith("\x00")),
            at=time.time(),
            state=state,
            labels=sorted(self.labels),
            load=os.getloadavg()[0],
            pid=os.getpid(),
            since=self.since,
            progress=progress,
            buffered=sorted({m.dispatch.job_id for m in self.backlog if m.dispatch is not None}),
            assigned=sorted(f"{t}[{p}]" for t, p in self.owned),
        )
        rec = Record(
            self.ctx.topic("workers.heartbeat"),
            encode(beat),
            self.id.encode(),
            partition=heartbeat_partition(self.ctx.registry, self.id),
        )
        m = self.ctx.metrics
        if m.enabled:
            used = self.slots - beat.slots_free
            m.gauge(
                "worker",
                {"worker": self.id},
                slots_total=self.slots,
                slots_used=used,
                running=len(beat.running),
                load=beat.load,
                draining=state != "running",
                # cumulative: sends ≤ events when batched
                event_sends=self.events.batches + self.starts.batches,
                events_sent=self.events.records + self.starts.records,
            )
            m.count("heartbeats_sent", {"worker": self.id})
            if state == "running":
                try:
                    lag = await self._call(self._lag)
                    m.gauge("consumer_lag", {"group": "workers", "worker": self.id}, messages=lag)
                except Exception as exc:  # lag is a nicety; never a reason to miss a beat
                    log.debug("lag: %s", exc)
        try:
            await self.ctx.producer.aproduce([rec], timeout_s=5.0)
        except Exception as exc:  # a missed heartbeat is not fatal; the next one follows
            log.warning("heartbeat not sent: %s", exc)

    def _lag(self) -> int:
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

    async def _heartbeats(self) -> None:
        while True:
            state: HeartbeatState = "draining" if self.stopping.is_set() else "running"
            await self._heartbeat(state)
            await asyncio.sleep(self.ctx.settings.heartbeat_interval_s)

    async def _leave_group(self) -> None:
        """A draining worker starts nothing more, so its partitions go to live workers now,
        not when it exits: what started here is committed on the revoke, what was buffered
        is read again by the next owner (a worker kept its partitions unread for its whole
        drain; measured in ``make chaos``: a dispatch waited 40 s, handed back twice)."""
        try:
            await self._call(self.consumer.unsubscribe)
            deadline = time.monotonic() + 5.0
            while self.owned and time.monotonic() < deadline:
                # serves the revoke; a message it may still return was never started here
                await self._call(self.consumer.poll, 0.1)
        except KafkaException as exc:
            log.warning("draining: could not leave the consumer group at once: %s", exc)

    async def _drain(self) -> None:
        await self._leave_group()
        if not self.running:
            return
        s = self.ctx.settings
        log.warning(
            "draining: waiting up to %.0f s for %d running jobs", s.drain_grace_s, len(self.running)
        )
        deadline = time.monotonic() + s.drain_grace_s
        while self.running and time.monotonic() < deadline and not self.aborting.is_set():
            await asyncio.wait(list(self.running.values()), timeout=0.2)
            await self._commit()
        self.aborting.set()
        # past the grace: hand back what may be killed; nokill jobs run on until a 2nd signal
        for key, handle in list(self.handles.items()):
            kind = s.kinds.get(self.kinds_of.get(key, ""))
            if kind is None or not kind.nokill or self._abort_now:
                handle.cancel("handed back")
        while self.running:
            await asyncio.wait(list(self.running.values()), timeout=0.5)
            if self._abort_now:
                for handle in list(self.handles.values()):
                    handle.cancel("handed back")
            await self._commit()

    _abort_now = False

    async def _hand_back_all(self) -> None:
        """Stop every running job and wait (bounded) for their hand-backs to be reported:
        a worker that fails must not leave attempts ``running`` behind it. What still is
        unreported after the bound, the monitor retries (a stopped worker runs nothing)."""
        log.error("worker loop failed: handing back %d running jobs", len(self.running))
        self.request_stop(abort=True)
        tasks = list(self.running.values())
        if tasks:
            await asyncio.wait(tasks, timeout=self.ctx.settings.kill_grace_s + 10.0)

    def request_stop(self, abort: bool = False) -> None:
        """First call drains (unless ``abort``); a second, or ``abort``, hands back at once."""
        if abort or self.stopping.is_set():
            self._abort_now = True
            self.aborting.set()
            for handle in list(self.handles.values()):
                handle.cancel("handed back")
        self.stopping.set()


async def run_worker(
    ctx: Context,
    *,
    slots: int | None = None,
    abort: bool = False,
    labels: list[str] | None = None,
) -> int:
    """Run a worker until SIGTERM/SIGINT; return the process exit code."""
    worker = Worker(ctx, slots=slots, labels=labels)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop, abort)
    freeze_startup_heap("the worker built")
    settling = asyncio.create_task(freeze_once_assigned(worker.assigned.is_set))
    try:
        await worker.run()
    finally:
        settling.cancel()
        await ctx.close()
    return 0
