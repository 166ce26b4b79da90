"""What a worker says about its attempts on ``jobs.events``: starts, outcomes, and the ends
of attempts that were cancelled, superseded or could not run.

Invariants:
- Records are keyed by the job's group (else its id), so one workflow's events keep order.
- Starts have their own, faster pacer (``worker_start_sends_per_s``, a burst of one per
  slot: a slot waits for its start); outcomes are paced at ``worker_sends_per_s``. Under
  load the records of one short interval share one produce call; each record's sender is
  told its own fate by a callback (``agents.worker.outbox``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agents.context import Context
from agents.core.pacing import Pacer
from agents.worker.outbox import Done, Outbox, Sender
from agents.worker.runner import Outcome
from streams.events import Dispatch, JobFailed, JobStarted, JobSucceeded, encode
from streams.kafka import Record


class Reports:
    def __init__(self, ctx: Context, worker_id: str, slots: int) -> None:
        s = ctx.settings
        self.id = worker_id
        self.topic = ctx.topic("jobs.events")
        burst = max(1.0, s.worker_sends_per_s / 10)
        self.sender = Sender(ctx.producer)  # starts and outcomes of a loop turn: one produce
        self.events = Outbox(ctx.producer, Pacer(s.worker_sends_per_s, burst), sender=self.sender)
        pacer = Pacer(s.worker_start_sends_per_s, float(slots))
        self.starts = Outbox(ctx.producer, pacer, sender=self.sender)
        self._background: set[asyncio.Future[Any]] = set()

    @property
    def sends(self) -> int:
        """Produce calls made so far (cumulative: ≤ ``records`` when batched)."""
        return self.sender.sends

    @property
    def records(self) -> int:
        return self.sender.records

    def record(self, d: Dispatch, event: Any) -> Record:
        return Record(self.topic, encode(event), (d.group or d.job_id).encode())

    def start(self, d: Dispatch, done: Done, log_path: str | None = None) -> JobStarted:
        """Send ``d``'s start (naming its log file); ``done(error)`` once the broker has it
        (or it was given up)."""
        started = JobStarted(
            job_id=d.job_id, attempt=d.attempt, worker=self.id, at=time.time(), log_path=log_path
        )
        self.starts.put(self.record(d, started), "publish started", done)
        return started

    def outcome(self, d: Dispatch, event: JobSucceeded | JobFailed, done: Done) -> None:
        self.events.put(self.record(d, event), "publish outcome", done)

    def failure(self, job_id: str, attempt: int, group: str | None, error: str) -> Record:
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
        return Record(self.topic, encode(event), (group or job_id).encode())

    def ended(self, d: Dispatch, why: str) -> Record:
        """The end of an attempt that was cancelled or superseded."""
        error = f"cancelled: {why}" if why else "cancelled"
        return self.failure(d.job_id, d.attempt, d.group, error)

    def unstarted(self, d: Dispatch, why: str) -> None:
        """A cancelled attempt's dispatch, dropped here before it started: say it is over
        (in the background; nothing waits for it)."""
        task = asyncio.ensure_future(self.events.deliver(self.ended(d, why), "publish outcome"))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def outcome_event(
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

    async def close(self) -> None:
        await self.starts.close()
        await self.events.close()
