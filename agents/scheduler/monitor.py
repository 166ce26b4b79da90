"""The liveness monitor: workers that fall silent are declared lost and their running jobs
retried; jobs a restarted worker left running are retried too. Its tick also steps the
host-load brake (``agents.scheduler.telemetry``, at most every ``brake_interval_s``).

Every scheduler process runs it; a PostgreSQL advisory lock lets one of them act per tick.
A tick (at most every second) declares workers lost after ``worker_lost_after_s`` without a
heartbeat (their slots leave the capacity), then publishes ``job.failed`` (retryable, no
backoff, counted) for the current attempt of every running job whose worker is lost or has
restarted since the job started, or that no live worker has run or held for the same bound
(its worker stopped without reporting it, or left it to a partition's next owner that never
took it). The dependency agent applies it like any failure: the job
goes back to ready (or fails after its last attempt) and its holds are released.

A dispatch confirmed a bound ago that no live worker runs or holds buffered is still in
Kafka; if no live worker is assigned its partition either (every worker of its pool is gone,
or the group has not settled for that long), it is handed back: ``job.failed`` of that
attempt, not counted, offered again after the kind's backoff. Should a worker read the old
dispatch later, its start is fenced and the dependency agent cancels that attempt.

Invariants:
- Fencing, not trust: the failure names the attempt; if the job moved on (finished, or
  already retried) the event changes nothing, and a lost worker that comes back cannot
  complete the old attempt (its report names a superseded attempt).
- Re-publishing is harmless (idempotent), so a crash between the lock and the publish only
  delays the retry to the next tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from agents.context import Context, retrying
from agents.pools import heartbeat_partition
from agents.scheduler.telemetry import thresholds
from agents.store import LostWork, Orphan, PostgresJobStore, Undelivered
from streams.events import JobFailed, encode
from streams.kafka import Record, client_config

log = logging.getLogger("jobstream.monitor")
REPUBLISH_AFTER_S = 30.0


def unowned(
    undelivered: Sequence[Undelivered],
    assigned: Collection[str],
    place: Callable[[str, str], str],
) -> list[Undelivered]:
    """The dispatches to hand back: those whose partition (``place(kind, job id)``, as
    ``topic[partition]``) no live worker is assigned. One on a live worker's partition is
    owned: that worker reads it in order (behind a full buffer, or once a rebalance ends)."""
    return [u for u in undelivered if place(u.kind, u.id) not in assigned]


class Monitor:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.sent: dict[tuple[str, int], float] = {}
        self.retried = 0
        self.lost = 0
        self.handed_back = 0
        self._watermarks: Consumer | None = None  # reads partitions' ends, never consumes
        self._brake_due = 0.0  # no brake transaction on every tick: at most twice an interval

    @property
    def tick_s(self) -> float:
        return min(1.0, self.ctx.settings.worker_lost_after_s / 5)

    async def run(self) -> None:
        # zero counters, so dashboards show 0 rather than "no data" before the first loss
        self.ctx.metrics.count("workers_lost", n=0)
        self.ctx.metrics.count("lost_work_retried", n=0)
        self.ctx.metrics.count("dispatches_handed_back", n=0)
        while True:
            try:
                await self.step()
            except Exception:  # the monitor must never take the agents down with it
                log.exception("monitor step failed; next try in %.1f s", self.tick_s)
            await asyncio.sleep(self.tick_s)

    async def step(self) -> LostWork:
        s = self.ctx.settings
        store = await self.ctx.store()
        brake = None
        if time.monotonic() >= self._brake_due:  # the store decides across processes
            self._brake_due = time.monotonic() + s.brake_interval_s / 2
            brake = await retrying(
                "brake",
                lambda: store.brake_step(
                    thresholds(self.ctx),
                    s.brake_interval_s,
                    s.capacity_factor,
                    s.worker_lost_after_s,
                ),
            )
        if brake is not None:
            target = brake["target"]
            self.ctx.metrics.gauge(
                "brake",
                target=brake["static"] if target is None else target,
                static=brake["static"],
                holding=target is not None,
            )
            if target is not None:
                log.warning(
                    "brake: slot capacity %d of %d (%s)", target, brake["static"], brake["reason"]
                )
        judged = await self._judged(store)
        work = await retrying(
            "monitor", lambda: store.lost_work(s.worker_lost_after_s, s.capacity_factor, judged)
        )
        if work.released:
            log.warning("gave back the holds of %d attempts that ended unreported", work.released)
        for worker in work.newly_lost:
            self.lost += 1
            self.ctx.metrics.count("workers_lost", {"worker": worker})
            log.warning("worker %s lost: no heartbeat for %.0f s", worker, s.worker_lost_after_s)
        now = time.monotonic()
        n = await self._fail_once(work.orphans, self._record, "lost_work_retried", now)
        if n:
            self.retried += n
            log.warning("retrying %d jobs of lost or restarted workers", n)
        gone = unowned(work.undelivered, work.assigned, self.ctx.dispatch_place)
        n = await self._fail_once(gone, self._hand_back, "dispatches_handed_back", now)
        if n:
            self.handed_back += n
            log.warning("handed back %d dispatches no live worker consumed", n)
        if len(self.sent) > 100_000:
            self.sent = {k: t for k, t in self.sent.items() if now - t < REPUBLISH_AFTER_S}
        return work

    async def _judged(self, store: PostgresJobStore) -> list[str]:
        """The silent workers whose silence is certain: their heartbeat partition is recorded
        to the broker's end. While the heartbeats agent is behind (the scheduler that owned
        the partition was killed and it has not moved yet), a worker that beats on is not
        lost: declaring it lost retried its running jobs as counted failures (``make
        chaos``: every worker lost at once after a scheduler's SIGKILL)."""
        s = self.ctx.settings
        silent, recorded = await retrying(
            "silent workers", lambda: store.silent_workers(s.worker_lost_after_s)
        )
        if not silent:
            return []
        topic = self.ctx.topic("workers.heartbeat")
        parts = {w: heartbeat_partition(self.ctx.registry, w) for w in silent}
        try:
            ends = await asyncio.to_thread(self._ends, topic, set(parts.values()))
        except KafkaException as exc:
            log.warning("heartbeat partitions' ends unknown (%s): no worker judged lost", exc)
            return []
        behind = {p for p, end in ends.items() if recorded.get(p, 0) < end}
        if behind:
            log.warning(
                "heartbeats of partitions %s not recorded to their end: %d silent workers "
                "not judged yet",
                sorted(behind),
                sum(1 for p in parts.values() if p in behind),
            )
        return [w for w, p in parts.items() if p not in behind]

    def _ends(self, topic: str, partitions: set[int]) -> dict[int, int]:
        """The broker's end offset of each partition (blocking: run in a thread)."""
        if self._watermarks is None:
            cfg = client_config(self.ctx.settings.require_kafka(), self.ctx.settings.kafka_config)
            cfg.update({"group.id": f"{self.ctx.settings.app_id}.monitor", "client.id": "monitor"})
            self._watermarks = Consumer(cfg)
        return {
            p: self._watermarks.get_watermark_offsets(
                TopicPartition(topic, p), timeout=2.0, cached=False
            )[1]
            for p in partitions
        }

    async def _fail_once(
        self,
        attempts: Sequence[Orphan] | Sequence[Undelivered],
        record: Callable[[Any], Record],
        metric: str,
        now: float,
    ) -> int:
        """Publish the failure of each attempt not published in the last
        ``REPUBLISH_AFTER_S`` (it may have been lost with a crashed scheduler); how many."""
        due = [
            a for a in attempts if now - self.sent.get((a.id, a.attempt), -1e9) > REPUBLISH_AFTER_S
        ]
        if due:
            records = [record(a) for a in due]
            await retrying(metric, lambda: self.ctx.producer.aproduce(records))
            for a in due:
                self.sent[(a.id, a.attempt)] = now
            self.ctx.metrics.count(metric, n=len(due))
        return len(due)

    def _hand_back(self, u: Undelivered) -> Record:
        place = self.ctx.dispatch_place(u.kind, u.id)
        event = JobFailed(
            job_id=u.id,
            attempt=u.attempt,
            worker="",
            at=time.time(),
            error=f"handed back: no live worker consumed {place} for {u.waited_s:.0f} s",
            retryable=True,
            # not counted (not the job's failure), but offered again after a growing delay:
            # a pool that no worker serves is not flooded with new attempts
            backoff=True,
            counts=False,
            # a shared resource stays held: the old dispatch may still reach a worker and
            # start before its cancel does (slots are bounded by each worker itself)
            keeps_holds=u.shared,
            unstarted=True,  # a start recorded first wins: that attempt runs on
        )
        return Record(self.ctx.topic("jobs.events"), encode(event), (u.group or u.id).encode())

    def _record(self, o: Orphan) -> Record:
        if o.why == "lost":
            why = f"worker {o.worker} lost: no heartbeat for {o.silent_s:.0f} s"
        elif o.why == "restarted":
            why = f"worker {o.worker} restarted while running this attempt"
        else:
            why = f"no live worker runs this attempt (started on {o.worker}, not reported)"
        event = JobFailed(
            job_id=o.id,
            attempt=o.attempt,
            worker=o.worker,
            at=time.time(),
            error=why[:4000],
            retryable=True,
            backoff=False,
            lost_worker=True,  # fenced: started again on a live worker, it runs on there
            # a shared resource stays held until no live worker runs or holds the attempt:
            # its redelivered dispatch may start on the partition's next owner before this
            # failure is known there (the monitor's sweep gives it back)
            keeps_holds=o.shared,
        )
        return Record(self.ctx.topic("jobs.events"), encode(event), (o.group or o.id).encode())
