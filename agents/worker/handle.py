"""The worker's grip on one running attempt (``AttemptHandle``): cancel, pause (SIGSTOP to
its process group, as FOSSology does), resume (SIGCONT); paused time does not count against
the timeout. Safe to call before the process exists or after it ended."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class AttemptHandle:
    """The worker's grip on a running attempt: cancel it, pause it (SIGSTOP to its process
    group, as FOSSology does), resume it (SIGCONT). Paused time does not count against the
    timeout. Safe to call before the process exists or after it ended."""

    __slots__ = (
        "proc",
        "stopped",
        "reason",
        "paused_since",
        "paused_total",
        "progress_path",
        "pause_pending",
        "on_stop",
        "_waiter",
        "_ran",
        "_started",
    )

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._ran = False  # a process (or pool member) ran it
        self._started: asyncio.Event | None = None  # made when asked for (rare)
        self.stopped = False  # cancel() was called; ``reason`` says why
        self.reason = ""
        self.paused_since: float | None = None
        self.paused_total = 0.0
        self.progress_path: str | None = None  # where the job may report its progress
        self.pause_pending = False  # paused before its process existed: paused when it does
        # called by ``cancel`` (a slot that waits on a pool member's reply without a task)
        self.on_stop: Callable[[], object] | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def started(self) -> asyncio.Event:
        """Set once the process (or pool member) runs the attempt."""
        if self._started is None:
            self._started = asyncio.Event()
            if self._ran:
                self._started.set()
        return self._started

    def cancel(self, reason: str) -> None:
        if not self.stopped:
            self.reason = reason
            self.stopped = True
        if self.paused_since is not None:  # a stopped process cannot handle SIGTERM
            self.resume()
        wake(self._waiter)
        if self.on_stop is not None:
            self.on_stop()

    def pause(self) -> bool:
        if self.proc is None:
            if self._ran or self.stopped:
                return False  # its process ended (a pool member is another job's by now)
            self.pause_pending = True  # not started yet: paused as soon as it is
            return True
        if self.proc.returncode is not None or self.paused_since is not None:
            return False
        signal_group(self.proc, signal.SIGSTOP)
        self.paused_since = time.monotonic()
        return True

    def attach(self, proc: asyncio.subprocess.Process) -> None:
        """The attempt's process (or pool member) runs it now; a pause sent before that
        takes effect at once."""
        self.proc = proc
        self._ran = True
        if self._started is not None:
            self._started.set()
        if self.pause_pending:
            self.pause_pending = False
            self.pause()

    def detach(self) -> None:
        """The attempt's process is done with it: a pooled member goes back to the pool and
        runs other jobs, which a late pause or resume of this attempt must never reach."""
        self.proc = None
        self.paused_since = None

    def resume(self) -> bool:
        if self.pause_pending:
            self.pause_pending = False
            return True
        if self.paused_since is None:
            return False
        self.paused_total += time.monotonic() - self.paused_since
        self.paused_since = None
        if self.proc is not None and self.proc.returncode is None:
            signal_group(self.proc, signal.SIGCONT)
        return True

    @property
    def progress_file(self) -> Path | None:
        return None if self.progress_path is None else Path(self.progress_path)

    def progress(self) -> float | None:
        """What the job last wrote to ``$JOBSTREAM_PROGRESS_FILE`` (0..1), if anything."""
        if self.progress_file is None:
            return None
        try:
            value = float(self.progress_file.read_text().strip() or "nan")
        except (OSError, ValueError):
            return None
        return min(1.0, max(0.0, value)) if value == value else None


def wake(fut: asyncio.Future[Any] | None, _: object = None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)
