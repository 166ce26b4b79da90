"""The worker's heartbeats on ``workers.heartbeat``: what it runs and buffers, its free
slots, its jobs' progress, its load; once per ``heartbeat_interval_s`` and on every state
change (running, draining, stopped). A missed heartbeat is logged, never fatal."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Literal

from agents.context import Context
from agents.pools import heartbeat_partition
from agents.worker.backlog import Backlog
from agents.worker.reports import Reports
from agents.worker.slots import Slots
from agents.worker.source import DispatchSource
from streams.events import WorkerHeartbeat, encode
from streams.kafka import Record

log = logging.getLogger("jobstream.worker")
HeartbeatState = Literal["running", "draining", "stopped"]


class Heartbeats:
    def __init__(
        self,
        ctx: Context,
        worker_id: str,
        labels: frozenset[str],
        slots: Slots,
        backlog: Backlog,
        consumer: DispatchSource,
        reports: Reports,
    ) -> None:
        self.ctx, self.id, self.labels = ctx, worker_id, labels
        self.slots, self.backlog, self.consumer, self.reports = slots, backlog, consumer, reports
        self.host = os.uname().nodename
        self.since = time.time()

    def sweep_progress(self) -> None:
        """Remove progress files of attempts no longer running here (one directory scan
        per heartbeat instead of an unlink per job)."""
        directory: Path = self.slots.progress_dir
        live = self.slots.live_progress_files()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name not in live:
                        try:
                            os.unlink(entry.path)
                        except FileNotFoundError:
                            pass
        except FileNotFoundError:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # never a reason to miss a beat
            log.warning("progress files: %s", exc)

    async def beat(self, state: HeartbeatState = "running") -> None:
        self.sweep_progress()
        slots = self.slots
        beat = WorkerHeartbeat(
            worker=self.id,
            host=self.host,
            slots_total=slots.size,
            slots_free=max(0, slots.free),
            running=slots.running_jobs(),
            at=time.time(),
            state=state,
            labels=sorted(self.labels),
            load=os.getloadavg()[0],
            pid=os.getpid(),
            since=self.since,
            progress=slots.progress(),
            buffered=self.backlog.job_ids(),
            assigned=sorted(f"{t}[{p}]" for t, p in self.consumer.owned),
        )
        rec = Record(
            self.ctx.topic("workers.heartbeat"),
            encode(beat),
            self.id.encode(),
            partition=heartbeat_partition(self.ctx.registry, self.id),
        )
        m = self.ctx.metrics
        if m.enabled:
            m.gauge(
                "worker",
                {"worker": self.id},
                slots_total=slots.size,
                slots_used=slots.size - beat.slots_free,
                running=len(beat.running),
                load=beat.load,
                draining=state != "running",
                # cumulative: sends ≤ events when batched
                event_sends=self.reports.sends,
                events_sent=self.reports.records,
                pool_members_recycled=slots.executor.pool.recycled,
            )
            m.count("heartbeats_sent", {"worker": self.id})
            if state == "running":
                try:
                    lag = await self.consumer.call(self.consumer.lag)
                    m.gauge("consumer_lag", {"group": "workers", "worker": self.id}, messages=lag)
                except Exception as exc:  # lag is a nicety; never a reason to miss a beat
                    log.debug("lag: %s", exc)
        try:
            await self.ctx.producer.aproduce([rec], timeout_s=5.0)
        except Exception as exc:  # a missed heartbeat is not fatal; the next one follows
            log.warning("heartbeat not sent: %s", exc)

    async def run(self, draining: asyncio.Event) -> None:
        while True:
            await self.beat("draining" if draining.is_set() else "running")
            await asyncio.sleep(self.ctx.settings.heartbeat_interval_s)
