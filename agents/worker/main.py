"""The worker: a member of the ``<app_id>.workers`` consumer group that runs dispatched jobs.

Workers keep no stream state, so they consume with confluent-kafka directly (batched). The
parts: ``consumer`` (fetching, rebalances, offset commits), ``backlog`` (dispatches not
started yet), ``slots`` (each attempt's way from its start to its report), ``reports``
(job events), ``control`` (cancel, pause, resume), ``heartbeat``; this module runs them and
drains.

Invariants:
- At most ``slots`` jobs run at once. Dispatches that arrive while all slots are busy are
  buffered and start earliest-due first; admission's capacity bounds how many can be
  outstanding, and past ``BUFFER_ROUNDS`` × slots buffered the worker pauses its partitions
  while it keeps serving rebalances. A buffered dispatch never waits while a slot is free:
  every step that buffers starts what free slots can take. Free/total slots go out in
  heartbeats.
- Kafka owns a dispatch until its job's start is on the broker, the heartbeat monitor
  after (``agents.worker.slots``): a worker that dies between the start and the commit has
  the dispatch redelivered to another worker (run again as the same attempt: completion
  stays single by attempt); one that dies after falls silent, and the monitor
  (``agents.scheduler.monitor``) retries its running jobs as a new attempt. A late report from the
  old attempt is fenced off by the attempt number.
- A worker whose loop fails hands its running jobs back before its ``stopped`` heartbeat.
- SIGTERM drains: no new work, the partitions go to live workers at once, running jobs get
  ``drain_grace_s`` to finish (``nokill`` kinds as long as they need), offsets are
  committed, exit 0. After the grace, or on a second signal or ``--abort``, running jobs
  are stopped and handed back: ``job.failed`` with ``counts=False``, so the attempt is
  retried at once elsewhere and not counted.
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
from pathlib import Path

from agents.context import Context
from agents.heap import freeze_once_assigned, freeze_startup_heap
from agents.pools import ensure_pool_topics, pools_served, worker_labels
from agents.worker.backlog import Backlog
from agents.worker.consumer import DispatchConsumer
from agents.worker.control import ControlReader
from agents.worker.heartbeat import Heartbeats
from agents.worker.reports import Reports
from agents.worker.runner import file_safe
from agents.worker.share import ShareDispatchConsumer
from agents.worker.slots import Slots
from agents.worker.source import DispatchSource

log = logging.getLogger("jobstream.worker")
BUFFER_ROUNDS = 4  # buffered dispatches beyond which a full worker pauses its partitions


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
        size = slots or s.worker_slots
        self.id = (
            worker_id
            or s.worker_id
            or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.labels = worker_labels(s, labels)
        # running jobs' progress files, swept once per heartbeat
        progress_dir = Path(s.log_dir) / ".progress" / file_safe(self.id)[:120]
        self._fetch_at = max(1, size // 2)  # room in the buffer that triggers a fetch
        self.share: ShareDispatchConsumer | None = None
        self.dispatches: DispatchSource
        if s.worker_dispatch == "share":
            self.dispatches = self.share = ShareDispatchConsumer(ctx, self.id, self._fetch_at)
        else:
            self.dispatches = DispatchConsumer(ctx, self.id)
        self.backlog = Backlog(self.dispatches.tracker, s.max_payload_bytes)
        self.dispatches.on_drop = self.backlog.drop_partitions
        if ctx.tracer.on:
            self.backlog.on_fetched = lambda b: ctx.tracer.mark(
                "fetched", (b.key or b"-").decode(errors="replace")
            )
        self.reports = Reports(ctx, self.id, size)
        self.slots = Slots(
            ctx, self.id, size, self.dispatches, self.reports, self.backlog, progress_dir
        )
        self.control = ControlReader(
            ctx, self.id, self.slots, self.backlog, self.dispatches, self.reports
        )
        self.heartbeats = Heartbeats(
            ctx, self.id, self.labels, self.slots, self.backlog, self.dispatches, self.reports
        )
        if self.share is not None:
            share, slots_ = self.share, self.slots
            share.full = lambda: slots_.free <= 0
            share.unstarted = lambda: [(m.tp, m.offset) for m in self.backlog.items]
            share.tracker.on_settled = slots_.wake
        self.stopping = asyncio.Event()
        self._abort_now = False

    @property
    def assigned(self) -> asyncio.Event:
        return self.dispatches.assigned

    def topics(self) -> list[str]:
        """``jobs.dispatch`` and the dispatch topic of every pool this worker serves."""
        base = self.ctx.topic("jobs.dispatch")
        return [
            base,
            *(f"{base}.{p}" for p in sorted(pools_served(self.ctx.settings, self.labels))),
        ]

    async def run(self) -> None:
        s = self.ctx.settings
        await ensure_pool_topics(s, self.ctx.registry, pools_served(s, self.labels), set())
        self.slots.progress_dir.mkdir(parents=True, exist_ok=True)
        await self.dispatches.subscribe(self.topics())
        await self.control.assign()
        self.slots.executor.warm()
        beat = asyncio.create_task(self.heartbeats.run(self.stopping))
        controls = asyncio.create_task(self.control.run())
        clean = False
        try:
            while not self.stopping.is_set():
                if self.share is not None:
                    await self._take_shared(self.share)
                    continue
                # prefetch at most one round, and fetch once half a round has room (one
                # consumer call per several jobs under load, at once when idle)
                room = self.slots.size - len(self.backlog)
                if room < self._fetch_at:
                    await self._when_full()
                    continue
                if self.dispatches.paused:
                    await self.dispatches.set_paused(False)
                self._buffer(await self.dispatches.fetch(room))
            await self._drain()
            clean = True
        finally:
            if not clean:  # the loop raised: its jobs are handed back, not left unreported
                await self._hand_back_all()
            beat.cancel()
            controls.cancel()
            await self.slots.close()
            await self.reports.close()
            await self.heartbeats.beat("stopped")
            await self.dispatches.commit()
            await self.dispatches.close()
            await self.control.close()
            shutil.rmtree(self.slots.progress_dir, ignore_errors=True)

    def _buffer(self, msgs: list[object]) -> None:
        """Buffer what was fetched and start what free slots can take: a dispatch never
        waits in the buffer while a slot is free (slots that freed while a fetch was on its
        way took from the buffer then, and found it empty)."""
        self.backlog.add(msgs, lambda err: log.warning("consumer error: %s", err))
        self.slots.start_backlog()

    async def _take_shared(self, share: ShareDispatchConsumer) -> None:
        """Share groups: acquire only what free slots start now (a record acquired here is
        locked to this worker; the group hands the rest to workers with room), once half a
        round of slots is free and every record of the last poll is finished."""
        if self.backlog or self.slots.free < self._fetch_at or not share.ready():
            await self.slots.changed_within(0.05)
            return
        self._buffer(await share.fetch(self.slots.free))

    async def _when_full(self) -> None:
        """Every slot is busy and (at least half) a round is buffered. Wait a moment for
        the slots to take half a round from the buffer; if they do not, keep consuming (the
        group keeps this member and rebalances are served) and buffer what arrives:
        admission's capacity bounds what can be outstanding, and the buffer starts
        earliest-due first, so an urgent dispatch that lands here waits for the next free
        slot only. Pausing costs ~0.8 s before messages
        flow again after the resume (measured), so the partitions are paused only when the
        buffer reaches ``BUFFER_ROUNDS`` × slots."""
        if await self.slots.room_within(self._fetch_at, 0.05):
            return  # the main loop tops the buffer up
        limit = BUFFER_ROUNDS * self.slots.size
        paused = self.dispatches.paused
        if len(self.backlog) >= limit and not paused:
            await self.dispatches.set_paused(True)
        elif len(self.backlog) < limit and paused:
            await self.dispatches.set_paused(False)
        # partitions assigned by a rebalance while paused are not paused: what they deliver
        # is buffered like the rest (never dropped)
        self._buffer(await self.dispatches.consume_now(limit - len(self.backlog)))

    async def _drain(self) -> None:
        """A draining worker starts nothing more, so its partitions go to live workers now,
        not when it exits (a worker kept its partitions unread for its whole drain;
        measured in ``make chaos``: a dispatch waited 40 s, handed back twice)."""
        await self.dispatches.leave_group()
        slots = self.slots
        if not slots.running:
            return
        s = self.ctx.settings
        log.warning(
            "draining: waiting up to %.0f s for %d running jobs",
            s.drain_grace_s,
            len(slots.running),
        )
        deadline = time.monotonic() + s.drain_grace_s
        while slots.running and time.monotonic() < deadline and not slots.aborting:
            await slots.changed_within(0.2)
            await self.dispatches.commit()
        slots.aborting = True
        # past the grace: hand back what may be killed; nokill jobs run on until a 2nd signal
        slots.stop_all("handed back", keep_nokill=not self._abort_now)
        while slots.running:
            await slots.changed_within(0.5)
            if self._abort_now:
                slots.stop_all("handed back")
            await self.dispatches.commit()

    async def _hand_back_all(self) -> None:
        """Stop every running job and wait (bounded) for their hand-backs to be reported:
        a worker that fails must not leave attempts ``running`` behind it. What still is
        unreported after the bound, the monitor retries (a stopped worker runs nothing)."""
        log.error("worker loop failed: handing back %d running jobs", len(self.slots.running))
        self.request_stop(abort=True)
        deadline = time.monotonic() + self.ctx.settings.kill_grace_s + 10.0
        while self.slots.running and time.monotonic() < deadline:
            await self.slots.changed_within(0.5)

    def request_stop(self, abort: bool = False) -> None:
        """First call drains (unless ``abort``); a second, or ``abort``, hands back at once."""
        if abort or self.stopping.is_set():
            self._abort_now = True
            self.slots.aborting = True
            self.slots.stop_all("handed back")
        self.slots.stopping = True
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
