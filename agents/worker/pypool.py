"""A warm pool of child interpreters for Python jobs (``python -m agents.pycall --serve``).

Invariants:
- A member runs one job at a time, in its own process group; the worker loop only writes a
  line and is called back with a line, so a job that hangs, crashes or leaks cannot block it.
- A member whose job was stopped (timeout, cancel, hand-back) or whose interpreter died is
  killed and replaced on demand; only a member that answered is reused, until its resident
  size passes ``max_rss_mb`` (or, when set, it ran ``max_jobs`` jobs): no restart per fixed
  number of jobs. At most ``size`` members exist.
- The hot path is one non-blocking ``write`` and one ``read`` per job on the member's own
  pipes, watched by the event loop, the reply calling its caller back (no stream objects,
  no task or future per call): a pooled job costs
  the worker tens of microseconds, not hundreds (``bench workers``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgspec

_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
_encode = msgspec.json.Encoder().encode
RSS_CHECK_EVERY = 50  # jobs between two reads of a member's resident size
_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(pid: int) -> int:
    """A process's resident set size (0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class Member:
    """One warm interpreter: requests go down its stdin, one reply line (the exit code) comes
    back on its stdout per request."""

    def __init__(self, proc: asyncio.subprocess.Process, requests: int, replies: int) -> None:
        self.proc = proc
        self.jobs = 0
        self._loop = asyncio.get_running_loop()
        self._w = requests
        self._r = replies
        self._out = bytearray()  # request bytes the pipe did not take yet
        self._in = bytearray()  # reply bytes before a newline
        self._reply: Callable[[int | None], object] | None = None
        self._open = True
        self._loop.add_reader(replies, self._readable)

    def call(self, request: dict[str, Any], reply: Callable[[int | None], object]) -> None:
        """Send a job; ``reply(exit code)`` when it answered, ``reply(None)`` when the
        interpreter ended instead (never from within this call)."""
        self.jobs += 1
        if not self._open:
            self._loop.call_soon(reply, None)
            return
        self._reply = reply
        self._write(_encode(request) + b"\n")

    def ask(self, request: dict[str, Any]) -> asyncio.Future[int | None]:
        """:meth:`call` as a future."""
        fut: asyncio.Future[int | None] = self._loop.create_future()
        self.call(request, partial(_answer, fut))
        return fut

    def _write(self, data: bytes) -> None:
        if self._out:
            self._out += data
            return
        try:
            n = os.write(self._w, data)
        except BlockingIOError:
            n = 0
        except OSError:  # the interpreter is gone (broken pipe)
            self._ended()
            return
        if n < len(data):
            self._out += data[n:]
            self._loop.add_writer(self._w, self._writable)

    def _writable(self) -> None:
        try:
            n = os.write(self._w, self._out)
        except BlockingIOError:
            return
        except OSError:
            self._ended()
            return
        del self._out[:n]
        if not self._out:
            self._loop.remove_writer(self._w)

    def _readable(self) -> None:
        try:
            data = os.read(self._r, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._ended()
            return
        self._in += data
        while (i := self._in.find(b"\n")) >= 0:
            line = bytes(self._in[:i])
            del self._in[: i + 1]
            reply, self._reply = self._reply, None
            if reply is not None:
                try:
                    rc: int | None = int(line)
                except ValueError:  # not our protocol: treat the member as broken
                    rc = None
                reply(rc)

    def _ended(self) -> None:
        self.close()
        reply, self._reply = self._reply, None
        if reply is not None:
            reply(None)

    def close(self) -> None:
        """Stop watching and close this side of the pipes (idempotent)."""
        if not self._open:
            return
        self._open = False
        self._loop.remove_reader(self._r)
        if self._out:
            self._loop.remove_writer(self._w)
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.close()


def _answer(fut: asyncio.Future[int | None], rc: int | None) -> None:
    if not fut.done():
        fut.set_result(rc)


class PyPool:
    """At most ``size`` members; an idle one is taken without waiting (``try_acquire``, the
    worker's hot path), a new one is started on demand (``acquire``). A member is reused
    until its interpreter grew past ``max_rss_mb`` (checked every ``RSS_CHECK_EVERY`` jobs)
    or, when ``max_jobs`` is set, ran that many jobs."""

    def __init__(self, size: int, max_jobs: int = 0, max_rss_mb: float = 0) -> None:
        self.size = size
        self.max_jobs = max_jobs
        self.max_rss = int(max_rss_mb * 1024 * 1024)
        self.idle: list[Member] = []
        self.members = 0
        self.recycled = 0  # members replaced for their size or job count
        self._taken = 0  # members handed out and not released
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._reaping: set[asyncio.Task[Any]] = set()

    def try_acquire(self) -> Member | None:
        """A live idle member, or None (none idle, or ``size`` handed out)."""
        while self.idle and self._taken < self.size:
            m = self.idle.pop()
            if m.proc.returncode is None:
                self._taken += 1
                return m
            m.close()
            self.members -= 1
        return None

    async def acquire(self) -> Member:
        """An idle member, or a new one; waits while ``size`` are handed out."""
        while self._taken >= self.size:
            fut = asyncio.get_running_loop().create_future()
            self._waiting.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._wake()  # passed on: another waiter may take the turn
                raise
        m = self.try_acquire()
        if m is not None:
            return m
        self._taken += 1
        try:
            return await self._start()
        except BaseException:
            self._taken -= 1
            self._wake()
            raise

    async def _start(self) -> Member:
        env = dict(os.environ)
        extra = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join(x for x in (_PROJECT_ROOT, extra) if x)
        child_in, requests = os.pipe()
        replies, child_out = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agents.pycall",
                "--serve",
                stdin=child_in,
                stdout=child_out,
                stderr=asyncio.subprocess.DEVNULL,
                env=env,
                cwd=_PROJECT_ROOT,
                start_new_session=True,
            )
        except BaseException:
            for fd in (requests, replies):
                os.close(fd)
            raise
        finally:
            os.close(child_in)
            os.close(child_out)
        os.set_blocking(requests, False)
        os.set_blocking(replies, False)
        self.members += 1
        return Member(proc, requests, replies)

    async def warm(self) -> None:
        """Start members until ``size`` exist, one at a time, each idle once it runs: the
        first jobs find warm interpreters instead of waiting for ``size`` of them to start
        at once on a busy machine (seconds). A job that arrives meanwhile starts its own
        member as usual; warming stops when the pool is full."""
        while self.members < self.size:
            member = await self._start()
            self.idle.append(member)
            self._wake()

    def release(self, member: Member, healthy: bool) -> None:
        if healthy and member.proc.returncode is None and not self._worn(member):
            self.idle.append(member)
        else:
            self.members -= 1
            member.kill()
            task = asyncio.ensure_future(member.proc.wait())  # reap it
            self._reaping.add(task)
            task.add_done_callback(self._reaping.discard)
        self._taken -= 1
        self._wake()

    def _worn(self, member: Member) -> bool:
        """Whether a healthy member is replaced: it ran ``max_jobs`` jobs, or its resident
        size passed ``max_rss_mb`` (read from /proc every ``RSS_CHECK_EVERY`` jobs)."""
        worn = bool(self.max_jobs) and member.jobs >= self.max_jobs
        if not worn and self.max_rss and member.jobs % RSS_CHECK_EVERY == 0:
            worn = resident_bytes(member.proc.pid) > self.max_rss
        if worn:
            self.recycled += 1
        return worn

    def _wake(self) -> None:
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def close(self) -> None:
        for m in self.idle:
            m.kill()
        for m in self.idle:
            await m.proc.wait()
        self.idle.clear()
