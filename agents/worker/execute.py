"""Running an attempt whose start is confirmed, without a task or a timer of its own on
the hot path: a Python entry point goes to an idle warm pool member (one pipe write) and the
member's reply calls back; one ticker checks every pooled job's time limit (paused time does
not count). What is rare takes a task: a command (its process is awaited, as
``agents.worker.runner.run_attempt`` does), a pool member that must be started, a stop
(SIGTERM, grace, SIGKILL), a member that died under its job.

Invariants:
- Every attempt handed to ``begin`` ends in exactly one ``finish(run, outcome)``, an error
  of the worker's own included (a retryable failure: the start is on the broker).
- A member is given back to the pool only after it answered; a stopped job's member, or
  one whose interpreter died, is killed and replaced.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from agents.context import Context
from agents.worker.backlog import Buffered
from agents.worker.handle import AttemptHandle
from agents.worker.pypool import Member, PyPool
from agents.worker.runner import (
    Outcome,
    Prepared,
    outcome_of,
    pooled_request,
    prepare,
    run_attempt,
    stop_group,
)
from streams.events import Dispatch

log = logging.getLogger("jobstream.worker")
TICK_S = 0.05  # how often running attempts' time limits are checked
Attempt = tuple[str, int]  # (job id, attempt); a rejected dispatch: ("\x00bad:t:p", offset)


class Run:
    """One attempt on its way through a slot."""

    __slots__ = (
        "key",
        "d",
        "msg",
        "handle",
        "prepared",
        "member",
        "began",
        "publishing",
        "stopping",
        "task",
    )

    def __init__(self, key: Attempt, d: Dispatch | None, msg: Buffered) -> None:
        self.key, self.d, self.msg = key, d, msg
        self.handle = AttemptHandle()
        self.prepared: Prepared | None = None
        self.member: Member | None = None
        self.began = 0.0
        self.publishing = False  # the process ended: only its report is left
        self.stopping = False  # a stop (timeout, cancel, hand-back) owns the rest
        # a rare path's task, held here: the event loop keeps only a weak reference
        self.task: asyncio.Task[None] | None = None


class Executor:
    def __init__(
        self,
        ctx: Context,
        worker_id: str,
        size: int,
        progress_dir: Path,
        finish: Callable[[Run, Outcome], None],
    ) -> None:
        s = ctx.settings
        self.ctx, self.id, self.progress_dir, self.finish = ctx, worker_id, progress_dir, finish
        self.pool = PyPool(size, s.worker_pool_max_jobs, s.worker_pool_max_rss_mb)
        # absolute: the stored path must name the file for a reader elsewhere (``jobstream job``)
        self.log_dir = os.path.abspath(s.log_dir)
        self._timed: set[Run] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self._warming: asyncio.Task[None] | None = None

    def warm(self) -> None:
        """Start the interpreter pool's members in the background when a kind runs in it."""
        if any(k.entrypoint for k in self.ctx.settings.kinds.values()):
            self._warming = asyncio.create_task(self._warm())

    async def _warm(self) -> None:
        try:
            await self.pool.warm()
        except Exception:  # the jobs start their members on demand, as without warming
            log.exception("warming the interpreter pool failed")

    def begin(self, run: Run) -> None:
        """Run the attempt whose start is confirmed; ``finish`` is called with its outcome."""
        d, h = run.d, run.handle
        assert d is not None
        run.began = time.monotonic()
        if h.stopped:  # cancelled or handed back before its process was made: none is
            self.finish(run, Outcome(False, None, h.reason or "cancelled", 0.0, None, True))
            return
        s = self.ctx.settings
        p = prepare(d, s.kinds.get(d.kind), self.log_dir, self.progress_dir)
        if isinstance(p, Outcome):
            self.finish(run, p)
            return
        run.prepared = p
        h.progress_path = p.progress
        if p.kind.entrypoint is None:
            run.task = asyncio.create_task(self._command(run))
            return
        member = self.pool.try_acquire()
        if member is None:
            run.task = asyncio.create_task(self._new_member(run))
            return
        self._call(run, member)

    def _call(self, run: Run, member: Member) -> None:
        """Hand the job to a pool member; its reply, a stop or the ticker goes on."""
        assert run.d is not None and run.prepared is not None
        run.member = member
        h = run.handle
        h.attach(member.proc)
        h.on_stop = partial(self._stop, run, None)
        member.call(pooled_request(run.d, run.prepared), partial(self._replied, run))
        if run.prepared.limit_s is not None:
            self._timed.add(run)
            if self._ticker is None:
                self._ticker = asyncio.get_running_loop().call_later(TICK_S, self._tick)
        if h.stopped:  # cancelled while a member was made for it
            self._stop(run, None)

    def _replied(self, run: Run, rc: int | None) -> None:
        if run.stopping:
            return  # the stop owns the end
        self._timed.discard(run)
        h, member, p = run.handle, run.member, run.prepared
        assert member is not None and p is not None
        h.on_stop = None
        if rc is None:  # the interpreter died under the job (os._exit, a crash, OOM kill)
            run.stopping = True
            run.task = asyncio.create_task(self._died(run))
            return
        h.detach()
        run.member = None
        self.pool.release(member, True)
        self.finish(run, outcome_of(p, rc, None, None, time.monotonic() - run.began, h))

    def _stop(self, run: Run, reason: str | None) -> None:
        """Stop a pooled job (its handle was cancelled, or ``reason``: its time is up)."""
        if run.stopping or run.member is None:
            return  # stopping already, or its reply is in and ended it
        run.stopping = True
        self._timed.discard(run)
        why = reason or run.handle.reason or "cancelled"
        run.task = asyncio.create_task(self._stopped(run, why))

    def _tick(self) -> None:
        """One timer for every pooled job's time limit (paused time does not count)."""
        self._ticker = None
        now = time.monotonic()
        for run in list(self._timed):
            h, p = run.handle, run.prepared
            assert p is not None and p.limit_s is not None
            if h.paused_since is None and now - run.began - h.paused_total >= p.limit_s:
                self._stop(run, f"timed out after {p.limit_s:g} s")
        if self._timed:
            self._ticker = asyncio.get_running_loop().call_later(TICK_S, self._tick)

    async def _stopped(self, run: Run, reason: str) -> None:
        member, p, h = run.member, run.prepared, run.handle
        assert member is not None and p is not None
        try:
            await stop_group(member.proc, h, self.ctx.settings.kill_grace_s)
            rc = member.proc.returncode
            outcome = outcome_of(p, rc, reason, None, time.monotonic() - run.began, h)
        except Exception as exc:
            outcome = self.own_error(run, exc)
        finally:
            h.on_stop = None
            h.detach()
            run.member = None
            self.pool.release(member, False)
        self.finish(run, outcome)

    async def _died(self, run: Run) -> None:
        member, p, h = run.member, run.prepared, run.handle
        assert member is not None and p is not None
        try:
            rc = await member.proc.wait()
        finally:
            h.detach()
            run.member = None
            self.pool.release(member, False)
        error = None if rc else "the Python job's interpreter ended unexpectedly"
        self.finish(run, outcome_of(p, rc, None, error, time.monotonic() - run.began, h))

    async def _new_member(self, run: Run) -> None:
        try:
            member = await self.pool.acquire()
        except Exception as exc:
            self.finish(run, self.own_error(run, exc))
            return
        self._call(run, member)

    async def _command(self, run: Run) -> None:
        d = run.d
        assert d is not None
        s = self.ctx.settings
        try:
            outcome = await run_attempt(
                d,
                s.kinds.get(d.kind),
                log_dir=self.log_dir,
                kill_grace_s=s.kill_grace_s,
                handle=run.handle,
                progress_dir=self.progress_dir,
            )
        except Exception as exc:
            outcome = self.own_error(run, exc)
        self.finish(run, outcome)

    def own_error(self, run: Run, exc: Exception) -> Outcome:
        """The start is on the broker: whatever went wrong here, the attempt must end with a
        report, or it stays ``running`` while this worker lives on."""
        log.error("job %s attempt %d: the worker could not run it: %r", *run.key, exc)
        error = f"worker {self.id} could not run the job: {exc!r}"
        return Outcome(False, None, error, 0.0, None, True)

    async def close(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
        await self.pool.close()
