"""The worker's member of the ``<app_id>.workers-share`` share group (KIP-932, opt-in:
``worker_dispatch = "share"``): any number of workers read a pool's partitions, each record
handed to one of them, so a pool scales past its partition count.

The hand-over from Kafka to the monitor is the consumer group's, per record instead of per
position: a record is acknowledged (accepted) once its job's start is on the broker, so one
acquired by a worker that dies before that is redelivered once its lock passes (the same
attempt, fenced as with a consumer group), and a job whose start was acknowledged is the
monitor's to retry.

Invariants:
- A worker acquires only what its free slots can start now (a record acquired here is
  locked to this worker, ``group.share.record.lock.duration.ms``, 30 s by default): it
  polls only with free slots, at most ``batch`` records a poll, and only once every record
  of its last poll is acknowledged (the client's rule in explicit mode). Dispatches are
  produced one record batch each (``Context.dispatch_producer``): the broker acquires whole
  batches.
- Every consumer call runs on one dedicated thread (the client is not thread-safe), the
  acknowledgement callback included; its results reach the loop with
  ``call_soon_threadsafe``.
- A dispatch holding a shared resource runs only once the broker accepted its
  acknowledgement (``CommitWaits.acknowledged``); refused (its lock had passed), it runs
  where it was redelivered.
- Draining gives the unstarted records back (released) at once.
- Heartbeats list the pool's partitions as this worker's while it is full or joining: a
  dispatch still in Kafka then waits for a slot; with free slots and nothing delivered for
  the monitor's bound, it is handed back (a record archived after the broker's delivery
  limit, or locked by a dead worker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import AcknowledgeType, KafkaException, ShareConsumer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

from agents.context import Context
from agents.core.pacing import Pacer
from agents.errors import ConfigError
from agents.worker.commits import CommitWaits
from streams.kafka import client_config

log = logging.getLogger("jobstream.worker")
TP = tuple[str, int]
JOIN_S = 30.0  # a member answers for the pool's partitions until its first record, at most
# the group reads every record produced since it began (the broker's default is the latest)
GROUP_CONFIG = {"share.auto.offset.reset": "earliest"}


def group_timers(lost_after_s: float) -> dict[str, str]:
    """A share group's session timeout, heartbeat and record lock for workers declared lost
    after ``lost_after_s``: a silent member leaves, and a record it acquired is released,
    about when the monitor retries its running jobs."""
    session_ms = int(min(60_000, max(6_000, lost_after_s * 1000)))
    return {
        "share.session.timeout.ms": str(session_ms),
        "share.heartbeat.interval.ms": str(max(1_000, session_ms // 4)),
        "share.record.lock.duration.ms": str(session_ms),
    }


class ShareAcks:
    """Records acquired and not acknowledged yet: ``started`` on arrival, ``finished`` once
    its start is on the broker (or it was skipped): then acknowledged (accepted) with the
    next consumer call."""

    def __init__(self) -> None:
        self.pending: set[tuple[TP, int]] = set()  # acquired, not finished
        self.done: list[tuple[TP, int]] = []  # finished, not acknowledged yet
        self.on_settled: Callable[[], None] = lambda: None  # pending went empty

    def started(self, tp: TP, offset: int) -> None:
        self.pending.add((tp, offset))

    def finished(self, tp: TP, offset: int) -> None:
        key = (tp, offset)
        if key in self.pending:
            self.pending.discard(key)
            self.done.append(key)
            if not self.pending:
                self.on_settled()

    def forget(self, tp: TP) -> None:
        """Nothing to do: a share group moves no partitions."""

    def take_done(self) -> list[tuple[TP, int]]:
        done, self.done = self.done, []
        return done


class ShareDispatchConsumer:
    def __init__(self, ctx: Context, worker_id: str, batch: int) -> None:
        s = ctx.settings
        self.ctx, self.id = ctx, worker_id
        self.group = f"{s.app_id}.workers-share"
        self.tracker = ShareAcks()
        self.waits = CommitWaits()
        self.assigned = asyncio.Event()
        self.paused = False
        self.on_drop: Callable[[set[TP]], None] = lambda _gone: None
        self.full: Callable[[], bool] = lambda: False  # every slot busy (set by the worker)
        self.unstarted: Callable[[], list[tuple[TP, int]]] = lambda: []  # the buffered ones
        self._served: frozenset[TP] = frozenset()
        self._joining_until = 0.0
        self._pacer = Pacer(s.worker_sends_per_s, max(1.0, s.worker_sends_per_s / 10))
        self._soon = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kafka-share")
        self._background: set[asyncio.Future[Any]] = set()
        cfg = client_config(s.require_kafka(), s.kafka_config)
        cfg.update(
            {
                "group.id": self.group,
                "client.id": worker_id,
                "share.acknowledgement.mode": "explicit",
                "max.poll.records": max(1, batch),
                # a full worker does not poll (it would acquire what it cannot start);
                # liveness is the group's heartbeat, sent by the client's own thread
                "max.poll.interval.ms": 86_400_000,
            }
        )
        self.consumer = ShareConsumer(cfg)
        self.consumer.set_acknowledgement_commit_callback(self._on_acked)

    @property
    def owned(self) -> frozenset[TP]:
        if self.full() or time.monotonic() < self._joining_until:
            return self._served
        return frozenset()

    async def call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)`` on the consumer's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kw))

    async def subscribe(self, topics: list[str]) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._configure_group)
        await self.call(self.consumer.subscribe, topics)
        parts = self.ctx.registry["jobs.dispatch"].partitions
        self._served = frozenset((t, p) for t in topics for p in range(parts))
        self._joining_until = time.monotonic() + JOIN_S
        log.info("taking dispatches of %s through share group %s", topics, self.group)
        self.assigned.set()

    def _configure_group(self) -> None:
        """The group reads what was produced before it began, and a member that falls
        silent leaves it (its partitions move, its records are released) when the monitor
        declares its worker lost, as in the consumer group. A broker whose bounds refuse
        those timers keeps its own (45 s by default), with a warning."""
        s = self.ctx.settings
        admin = AdminClient(client_config(s.require_kafka(), s.kafka_config))
        timers = group_timers(s.worker_lost_after_s)
        try:
            self._alter(admin, {**GROUP_CONFIG, **timers})
            return
        except KafkaException as exc:
            first = exc
        try:
            self._alter(admin, GROUP_CONFIG)
        except KafkaException as exc:
            raise ConfigError(
                f"worker_dispatch = 'share': could not configure share group {self.group!r} "
                f"({exc.args[0]}); share groups need Kafka 4.2 or later"
            ) from exc
        log.warning(
            "share group %s keeps the broker's session timeout and record lock (%s): a lost "
            "worker's partitions move later than worker_lost_after_s; lower the broker's "
            "group.share.min.* bounds (docs/workers.md)",
            self.group,
            first.args[0],
        )

    def _alter(self, admin: AdminClient, config: dict[str, str]) -> None:
        entries = [
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
            for k, v in config.items()
        ]
        resource = ConfigResource(ResourceType.GROUP, self.group, incremental_configs=entries)
        for fut in admin.incremental_alter_configs([resource]).values():
            fut.result(timeout=30)

    # -- fetching ----------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether a poll may go: every record of the last one is finished."""
        return not self.tracker.pending

    async def fetch(self, room: int) -> list[Any]:
        """What the group hands this worker (up to ``batch``), waiting at most 50 ms."""
        return await self.call(self._poll)  # type: ignore[no-any-return]

    def _poll(self) -> list[Any]:
        self._acknowledge()
        msgs = list(self.consumer.poll(0.05))
        if msgs:
            self._joining_until = 0.0
        return msgs

    async def consume_now(self, n: int) -> list[Any]:
        return []  # a full worker acquires nothing: the group hands it to one with room

    async def set_paused(self, paused: bool) -> None:
        self.paused = paused

    # -- acknowledgements ----------------------------------------------------------------

    def _acknowledge(self) -> bool:
        """Accept what finished (consumer thread); whether anything was."""
        done = self.tracker.take_done()
        for tp, offsets in self._ack(done, AcknowledgeType.ACCEPT).items():
            self._on_loop(self.waits.acknowledged, tp, offsets, False)
        return bool(done)

    def _ack(self, records: list[tuple[TP, int]], how: Any) -> dict[TP, set[int]]:
        """Acknowledge ``records`` as ``how`` (consumer thread); the refused ones."""
        refused: dict[TP, set[int]] = {}
        for (topic, partition), offset in records:
            try:
                self.consumer.acknowledge_offset(topic, partition, offset, how)
            except Exception as exc:  # no longer in flight here: its lock passed
                log.warning("%s[%d]@%d: not acknowledged: %s", topic, partition, offset, exc)
                refused.setdefault((topic, partition), set()).add(offset)
        return refused

    def _on_acked(self, offsets: dict[Any, set[int]], exc: Any) -> None:
        """The broker's answer to acknowledgements (consumer thread)."""
        if exc is not None:
            log.warning("acknowledgements refused: %s", exc)
        for tp, got in offsets.items():
            ok = exc is None and getattr(tp, "error", None) is None
            self._on_loop(self.waits.acknowledged, (tp.topic, tp.partition), set(got), ok)

    def _on_loop(self, fn: Any, *args: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(fn, *args)

    def _commit(self) -> None:
        """Send what finished and wait for the broker's answer (consumer thread)."""
        if self._acknowledge():
            self._commit_sync()

    def _commit_sync(self) -> None:
        try:
            self.consumer.commit_sync(5.0)
        except KafkaException as exc:
            log.warning("acknowledgement commit failed (the next poll resends it): %s", exc)

    def commit_soon(self) -> None:
        """Send the acknowledgements of what finished: at once while the pacer has tokens,
        else when it has one again (the next poll carries them too)."""
        if self._soon:
            return
        self._soon = True
        loop = asyncio.get_running_loop()
        wait = self._pacer.wait(time.monotonic())
        loop.call_later(wait, self._commit_now) if wait > 0 else loop.call_soon(self._commit_now)

    def _commit_now(self) -> None:
        self._soon = False
        self._pacer.take(time.monotonic())
        t = asyncio.ensure_future(self.call(self._commit))
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def commit(self) -> None:
        await self.call(self._commit)

    async def committed_past(self, topic: str, partition: int, offset: int) -> bool:
        return False  # no positions: the acknowledgement's answer decided

    # -- leaving -------------------------------------------------------------------------

    async def leave_group(self) -> None:
        """Draining: give every buffered record back to the group at once (its lock would
        keep it from the other workers), and poll no more."""
        gone = self.unstarted()
        for key in gone:
            self.tracker.pending.discard(key)
        self.on_drop({tp for tp, _ in gone})

        def release() -> None:
            self._acknowledge()
            self._ack(gone, AcknowledgeType.RELEASE)
            self._commit_sync()

        if gone:
            log.info("draining: %d buffered dispatches given back to the share group", len(gone))
        await self.call(release)

    def lag(self) -> int:
        return 0  # a share group has no position per member

    async def close(self) -> None:
        await self.call(self.consumer.close)
        self._pool.shutdown(wait=False)
