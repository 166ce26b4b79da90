"""Operator controls of the jobs a worker holds, read from ``jobs.control``: cancel one
attempt, pause or resume a job's process group (SIGSTOP/SIGCONT).

Invariants:
- The worker reads the topic from ``CONTROL_LOOKBACK_S`` ago on, with no group membership
  and no commits, and applies that minute before any dispatch runs: a cancel sent just
  before this worker started still counts.
- A cancel names its attempt (the control agent resolves an operator's cancel to the
  attempt in flight): a buffered dispatch of it is dropped (its end reported), a running
  one is stopped. A pause reaches a dispatch still buffered here too (it starts stopped).
- A control hiccup never stops the jobs; an unreadable command is skipped (the control
  agent dead-letters it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from agents.context import Context
from agents.worker.backlog import Backlog
from agents.worker.reports import Reports
from agents.worker.slots import CANCELLED_MEMORY, Slots
from agents.worker.source import DispatchSource
from streams.errors import InvalidEvent
from streams.events import Control, decode
from streams.kafka import client_config

log = logging.getLogger("jobstream.worker")
CONTROL_LOOKBACK_S = 60.0  # a cancel sent just before this worker started still counts


class ControlReader:
    def __init__(
        self,
        ctx: Context,
        worker_id: str,
        slots: Slots,
        backlog: Backlog,
        consumer: DispatchSource,
        reports: Reports,
    ) -> None:
        self.ctx, self.slots, self.backlog = ctx, slots, backlog
        self.dispatches, self.reports = consumer, reports
        s = ctx.settings
        cfg = client_config(s.require_kafka(), s.kafka_config)
        cfg.update(
            {
                "group.id": f"{s.app_id}.worker-control.{worker_id}",  # never commits: assign()
                "enable.auto.commit": False,
                "client.id": f"{worker_id}-control",
                "fetch.wait.max.ms": 100,
            }
        )
        self.consumer = Consumer(cfg)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kafka-control")
        self._loop: asyncio.AbstractEventLoop | None = None

    async def assign(self) -> None:
        """Read ``jobs.control`` from a minute ago on, and catch up before returning."""
        topic = self.ctx.topic("jobs.control")
        n = self.ctx.registry["jobs.control"].partitions
        since_ms = int((time.time() - CONTROL_LOOKBACK_S) * 1000)
        loop = self._loop = asyncio.get_running_loop()

        def assign() -> None:
            tps = [TopicPartition(topic, p, since_ms) for p in range(n)]
            try:
                found = self.consumer.offsets_for_times(tps, timeout=10)
            except KafkaException as exc:
                log.warning("control topic offsets: %s; reading from its end", exc)
                found = [TopicPartition(topic, p, OFFSET_END) for p in range(n)]
            self.consumer.assign(
                [
                    TopicPartition(t.topic, t.partition, t.offset if t.offset >= 0 else OFFSET_END)
                    for t in found
                ]
            )

        await loop.run_in_executor(self._pool, assign)
        await loop.run_in_executor(self._pool, self._catch_up, topic, n)

    def _catch_up(self, topic: str, partitions: int, limit_s: float = 10.0) -> None:
        """Apply the last minute of ``jobs.control`` before any dispatch runs here: a cancel
        sent before this worker started must be known before its dispatch arrives (the two
        consumers move independently). Bounded: a control topic that cannot be read does not
        keep the worker from working."""
        deadline = time.monotonic() + limit_s
        try:
            ends = {
                p: self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
                for p in range(partitions)
            }
        except KafkaException as exc:
            log.warning("control topic watermarks: %s; not caught up", exc)
            return
        while time.monotonic() < deadline:
            for cmd in self._commands(self.consumer.consume(num_messages=500, timeout=0.2)):
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self.apply, cmd)
            positions = self.consumer.position(
                [TopicPartition(topic, p) for p in range(partitions)]
            )
            if all(tp.offset >= ends[tp.partition] or ends[tp.partition] <= 0 for tp in positions):
                return
        log.warning("control topic not caught up within %.0f s", limit_s)

    def _commands(self, msgs: list[Any]) -> list[Control]:
        out = []
        max_bytes = self.ctx.settings.max_payload_bytes
        for m in msgs:
            if m.error():
                continue
            try:
                out.append(decode(m.value(), Control, max_bytes=max_bytes))
            except InvalidEvent:
                continue  # the control agent dead-letters it; here it just does nothing
        return out

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                msgs = await loop.run_in_executor(
                    self._pool, lambda: self.consumer.consume(num_messages=100, timeout=0.2)
                )
            except Exception as exc:  # a control hiccup must not stop the jobs
                log.warning("control consumer: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for cmd in self._commands(msgs):
                self.apply(cmd)

    def apply(self, cmd: Control) -> None:
        """Cancel one attempt, pause or resume the attempt of a job that runs here."""
        if cmd.scope != "job" or not cmd.name:
            return
        slots, job = self.slots, cmd.name
        if cmd.action == "cancel":
            if cmd.attempt is None:
                return
            key = (job, cmd.attempt)
            slots.remember_cancel(key, cmd.reason)
            for d in self.backlog.remove(*key):
                self.reports.unstarted(d, cmd.reason)
            handle = slots.handle(key)
            if handle is not None:
                log.warning("cancelling job %s attempt %d: %s", *key, cmd.reason or "no reason")
                handle.cancel(f"cancelled: {cmd.reason}" if cmd.reason else "cancelled")
            return
        if cmd.action == "pause":  # also for a dispatch still buffered here (started paused)
            slots.paused_jobs[job] = None
            while len(slots.paused_jobs) > CANCELLED_MEMORY:
                slots.paused_jobs.popitem(last=False)
        elif cmd.action == "resume":
            slots.paused_jobs.pop(job, None)
        here = slots.attempt_of.get(job)
        if here is None or (cmd.attempt is not None and cmd.attempt != here):
            return
        handle = slots.handle((job, here))
        if handle is None:
            return
        if cmd.action == "pause":
            if handle.pause():
                log.warning("paused job %s (SIGSTOP)", job)
        elif cmd.action == "resume" and handle.resume():
            log.warning("resumed job %s (SIGCONT)", job)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.consumer.close)
        self._pool.shutdown(wait=False)
