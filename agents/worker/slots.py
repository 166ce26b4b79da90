"""The worker's slots: each dispatch taken from the backlog runs as one attempt through a
small state machine driven by callbacks on the event loop (no task and no timer per job on
the hot path):

    take → start sent → start confirmed (offset finished) → run → outcome sent → reported

Running the job is ``agents.worker.execute``'s. What is rare takes a task of its own here: a
shared-resource job that waits for its offset commit, a dispatch that cannot be read.

Invariants:
- At most ``size`` attempts hold a slot; a slot is held until the job's process ends, not
  until its outcome is confirmed. A cancelled or superseded attempt holds it until its end
  is reported.
- A job runs only once its start is on the broker (then the monitor owns the attempt and
  the dispatch's offset may be committed); every attempt whose start is confirmed ends with
  a report, an error of the worker's own included (a retryable failure).
- Every per-job memory is per attempt (job id, attempt): a dispatch for an attempt already
  run here is not run twice; a cancelled attempt is not started (its end is reported); a
  newer attempt of a job whose older attempt runs here stops the older one; an older one is
  skipped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path

from agents.context import Context
from agents.deadletter import dead_letter
from agents.worker.backlog import Backlog, Buffered, DispatchId
from agents.worker.execute import Attempt, Executor, Run
from agents.worker.handle import AttemptHandle
from agents.worker.reports import Reports
from agents.worker.runner import Outcome, log_path
from agents.worker.source import DispatchSource
from streams.events import Dispatch

log = logging.getLogger("jobstream.worker")
CANCELLED_MEMORY = 100_000
SEEN_MEMORY = 100_000


class Slots:
    def __init__(
        self,
        ctx: Context,
        worker_id: str,
        size: int,
        consumer: DispatchSource,
        reports: Reports,
        backlog: Backlog,
        progress_dir: Path,
    ) -> None:
        self.ctx, self.id, self.size = ctx, worker_id, size
        self.consumer, self.reports, self.backlog = consumer, reports, backlog
        self.progress_dir = progress_dir
        self.executor = Executor(ctx, worker_id, size, progress_dir, self._finish)
        self.running: dict[Attempt, Run] = {}
        self.attempt_of: dict[str, int] = {}  # one attempt of a job at most runs here
        self.cancelled: OrderedDict[Attempt, str] = OrderedDict()
        self.paused_jobs: OrderedDict[str, None] = OrderedDict()  # until resumed
        self.seen: OrderedDict[Attempt, None] = OrderedDict()
        self.publishing = 0
        self.completed = 0
        self.handed_back = 0
        self.stopping = False  # draining: nothing new starts
        self._release: asyncio.TimerHandle | None = None  # the next held dispatch's instant
        self._release_at = math.inf
        self.aborting = False  # a stop now hands the job back
        self._changed: list[asyncio.Future[bool]] = []
        self._room: tuple[int, asyncio.Future[bool]] | None = None  # (room wanted, waiter)
        backlog.on_superseding = self._supersede_buffered
        self._tracing = ctx.tracer.on
        self._metrics = ctx.metrics if ctx.metrics.enabled else None

    @property
    def free(self) -> int:
        """Slots not running a process (a job whose process ended while its outcome is being
        reported does not hold one)."""
        return self.size - len(self.running) + self.publishing

    def handle(self, key: Attempt) -> AttemptHandle | None:
        """The handle of an attempt running here (cancel, pause, resume)."""
        run = self.running.get(key)
        return None if run is None or run.d is None else run.handle

    def _handles(self) -> list[tuple[Attempt, AttemptHandle]]:
        return [(k, r.handle) for k, r in self.running.items() if r.d is not None]

    def kind_of(self, key: Attempt) -> str | None:
        run = self.running.get(key)
        return None if run is None or run.d is None else run.d.kind

    async def changed_within(self, timeout_s: float) -> bool:
        """Wait until a slot frees or an attempt ends, at most ``timeout_s``."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._changed.append(fut)
        return await _within(fut, timeout_s)

    async def room_within(self, room: int, timeout_s: float) -> bool:
        """Wait until the backlog has ``room`` free places (started dispatches made it), at
        most ``timeout_s``: one wake-up per ``room`` jobs under load, not one per job."""
        if self.size - len(self.backlog) >= room:
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._room = (room, fut)
        try:
            return await _within(fut, timeout_s)
        finally:
            self._room = None

    def wake(self) -> None:
        """Wake what waits for a change (a share group's last poll is settled)."""
        self._notify()

    def _notify(self) -> None:
        if self._room is not None and self.size - len(self.backlog) >= self._room[0]:
            _settle(self._room[1], True)
        if self._changed:
            waiting, self._changed = self._changed, []
            for fut in waiting:
                _settle(fut, True)

    # -- taking dispatches -----------------------------------------------------------

    def start_backlog(self) -> None:
        """Start buffered dispatches while slots are free, earliest due first across
        partitions. Per partition, started ones always precede buffered ones, so the
        committable position never skips a started dispatch."""
        if self.stopping:
            return  # draining: the buffered dispatches go to the next owner
        while self.backlog.items and (free := self.free) > 0:
            batch = self.backlog.pop_upto(free, time.monotonic())
            if not batch:
                break  # what is buffered is held until its not-before
            for msg in batch:
                self.take(msg)
        if self.backlog.timed and self.free > 0:
            self._release_held()

    def _release_held(self) -> None:
        """Wake at the earliest not-before of a held dispatch (one timer for all of them;
        none while every slot is taken: a freed slot looks at the backlog anyway)."""
        at = self.backlog.next_not_before()
        if at is None or at >= self._release_at:
            return
        if self._release is not None:
            self._release.cancel()
        self._release_at = at
        loop = asyncio.get_running_loop()
        self._release = loop.call_at(max(at, loop.time() + 0.001), self._released)

    def _released(self) -> None:
        self._release, self._release_at = None, math.inf
        self.start_backlog()

    def take(self, msg: Buffered) -> None:
        d = msg.dispatch
        if d is None:
            bad = (f"\x00bad:{msg.topic}:{msg.partition}", msg.offset)
            run = self.running[bad] = Run(bad, None, msg)
            run.task = asyncio.create_task(self._reject(run))
            return
        key = (d.job_id, d.attempt)
        here = self.attempt_of.get(d.job_id)
        if key in self.seen or key in self.cancelled or (here is not None and here > d.attempt):
            # run here already, cancelled, or superseded by the attempt running here
            if key in self.cancelled and key not in self.seen:
                self.reports.unstarted(d, self.cancelled[key])
            self.consumer.tracker.finished(msg.tp, msg.offset)
            self.consumer.commit_soon()
            return
        if here is not None:
            # an older attempt of this job still runs here (e.g. a redelivered dispatch run
            # again after a worker died before its commit, then the monitor's retry): the
            # job moved on, so the old run is stopped (its report would be fenced off)
            self._supersede((d.job_id, here), d.attempt)
        self.seen[key] = None
        while len(self.seen) > SEEN_MEMORY:
            self.seen.popitem(last=False)
        waited = time.time() - max(d.dispatched_at, d.not_before or 0.0)
        if waited > 1.0:
            log.info(
                "job %s attempt %d reached this worker %.1f s after dispatch (%s[%d]@%d)",
                *key,
                waited,
                msg.topic,
                msg.partition,
                msg.offset,
            )
        run = self.running[key] = Run(key, d, msg)
        if d.job_id in self.paused_jobs:
            run.handle.pause()  # paused before it got here: its process starts stopped
        self.attempt_of[d.job_id] = d.attempt
        started = self.reports.start(
            d, partial(self._started, run), log_path(self.executor.log_dir, d)
        )
        if self._tracing:
            self.ctx.tracer.mark("started", d.job_id, at=started.at)
        m = self._metrics
        if m is not None:
            tags = {"kind": d.kind, "tenant": d.tenant}
            m.observe("start_latency_ms", max(0.0, (started.at - d.submitted_at) * 1000), tags)
            m.observe("dispatch_to_start_ms", max(0.0, (started.at - d.dispatched_at) * 1000))

    def _started(self, run: Run, exc: BaseException | None) -> None:
        """The start reached the broker (or its send was given up): the dispatch is done for
        Kafka (commit soon, paced); the job runs."""
        msg = run.msg
        self.consumer.tracker.finished(msg.tp, msg.offset)
        self.consumer.commit_soon()
        if exc is not None:
            log.warning("job %s attempt %d: its start was not sent: %s", *run.key, exc)
            self._end(run)
            return
        assert run.d is not None
        if run.d.shared:
            run.task = asyncio.create_task(self._when_committed(run))
        else:
            self.executor.begin(run)

    async def _when_committed(self, run: Run) -> None:
        """A job that holds a shared resource runs only once its dispatch is committed: a
        partition that moved before that has its next owner run the attempt (a second run
        here would share nothing it holds)."""
        tp, offset = run.msg.tp, run.msg.offset
        if not await self.consumer.waits.wait(
            tp, offset
        ) and not await self.consumer.committed_past(*tp, offset):
            log.warning(
                "job %s attempt %d: its dispatch was not confirmed as taken here (its partition "
                "moved, or its share lock passed); not run here",
                *run.key,
            )
            self.seen.pop(run.key, None)  # redelivered here later, it runs
            assert run.d is not None
            self._measure(run.d, Outcome(False, None, "", 0.0, None, True), "moved")
            self._end(run)
            return
        self.executor.begin(run)

    # -- running ---------------------------------------------------------------------

    # -- ending ----------------------------------------------------------------------

    def _finish(self, run: Run, outcome: Outcome) -> None:
        d, key = run.d, run.key
        assert d is not None
        if key in self.cancelled and not outcome.ok:
            # cancelled or superseded: the job's state moved on in PostgreSQL already; the
            # report (fenced off there) says the attempt's process is over, so what it holds
            # is given back
            self._measure(d, outcome, "cancelled")
            record = self.reports.ended(d, self.cancelled[key])
            self.reports.events.deliver_then(
                record, "publish outcome", partial(self._reported, run, None, "")
            )
            return
        run.publishing = True  # the process is done: its slot is free while it is reported
        self.publishing += 1
        self._slot_done()
        handed_back = self.aborting and not outcome.ok
        if handed_back:
            self.handed_back += 1
        event = self.reports.outcome_event(d, outcome, handed_back=handed_back)
        if self._tracing:
            self.ctx.tracer.mark("finished", d.job_id, at=event.at)
        result = "succeeded" if outcome.ok else "handed_back" if handed_back else "failed"
        self.reports.outcome(d, event, partial(self._reported, run, outcome, result))

    def _reported(
        self, run: Run, outcome: Outcome | None, result: str, exc: BaseException | None
    ) -> None:
        if exc is not None:
            log.warning("job %s attempt %d: its outcome was not sent: %s", *run.key, exc)
        elif outcome is not None:
            assert run.d is not None
            if self._tracing:
                self.ctx.tracer.mark("outcome_confirmed", run.d.job_id)
            self.completed += 1
            self._measure(run.d, outcome, result)
        self._end(run)

    def _end(self, run: Run) -> None:
        key = run.key
        self.running.pop(key, None)
        if run.d is not None and self.attempt_of.get(run.d.job_id) == run.d.attempt:
            del self.attempt_of[run.d.job_id]
        if run.publishing:
            self.publishing -= 1
            self._notify()
        else:
            self._slot_done()

    def _slot_done(self) -> None:
        self.start_backlog()
        self._notify()

    def _measure(self, d: Dispatch, outcome: Outcome, result: str) -> None:
        m = self._metrics
        if m is None:
            return
        m.count("jobs_finished", {"kind": d.kind, "result": result})
        m.observe("run_ms", outcome.duration_s * 1000, {"kind": d.kind})

    async def _reject(self, run: Run) -> None:
        """A dispatch the worker cannot run: dead-lettered, and when it names its attempt,
        that attempt fails with the reason."""
        msg = run.msg
        named: DispatchId | None = msg.named
        try:
            await dead_letter(self.ctx, [(msg.raw(), msg.error)])
            if named is not None:
                error = f"the worker cannot run this dispatch: {msg.error}"
                record = self.reports.failure(named.job_id, named.attempt, named.group, error)
                await self.reports.events.deliver(record, "publish outcome")
        finally:
            self.consumer.tracker.finished(msg.tp, msg.offset)
            self.consumer.commit_soon()
            self._end(run)

    # -- cancels, supersedes, stops --------------------------------------------------

    def _supersede_buffered(self, d: Dispatch) -> None:
        """Older attempts of ``d``'s job still buffered here (e.g. a dispatch handed back
        after its partition had no live owner, read with its successor once it has one)
        are dropped unstarted when their turn comes, not started and stopped."""
        for old in self.backlog.older_attempts(d):
            self.remember_cancel((old.job_id, old.attempt), f"superseded by attempt {d.attempt}")

    def _supersede(self, old: Attempt, attempt: int) -> None:
        self.remember_cancel(old, f"superseded by attempt {attempt}")
        handle = self.handle(old)
        if handle is not None:
            log.warning("job %s attempt %d superseded by attempt %d: stopped", *old, attempt)
            handle.cancel(f"superseded by attempt {attempt}")

    def remember_cancel(self, key: Attempt, reason: str) -> None:
        self.cancelled[key] = reason
        while len(self.cancelled) > CANCELLED_MEMORY:
            self.cancelled.popitem(last=False)

    def stop_all(self, reason: str, *, keep_nokill: bool = False) -> None:
        """Stop every running attempt (``keep_nokill``: not those of ``nokill`` kinds)."""
        kinds = self.ctx.settings.kinds
        for key, handle in self._handles():
            kind = kinds.get(self.kind_of(key) or "")
            if not keep_nokill or kind is None or not kind.nokill:
                handle.cancel(reason)

    def running_jobs(self) -> list[str]:
        return sorted(job for job, _ in self.running if not job.startswith("\x00"))

    def progress(self) -> dict[str, float]:
        out = {}
        for (job, _), h in self._handles():
            value = h.progress()
            if value is not None:
                out[job] = value
        return out

    def live_progress_files(self) -> set[str]:
        return {h.progress_path.rsplit("/", 1)[-1] for _, h in self._handles() if h.progress_path}

    async def close(self) -> None:
        await self.executor.close()


def _settle(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


async def _within(fut: asyncio.Future[bool], timeout_s: float) -> bool:
    """``fut``'s value, or False after ``timeout_s`` (one timer, no task)."""
    timer = asyncio.get_running_loop().call_later(timeout_s, _settle, fut, False)
    try:
        return await fut
    finally:
        timer.cancel()
