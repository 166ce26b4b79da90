"""A warm pool of child interpreters for Python jobs (``python -m agents.pycall --serve``).

Invariants:
- A member runs one job at a time, in its own process group; the worker loop only writes a
  line and is called back with a line, so a job that hangs, crashes or leaks cannot block it.
- A member whose job was stopped (timeout, cancel, hand-back), whose interpreter died, or
  that ran ``max_jobs`` jobs is killed and replaced on demand; only a member that answered
  is reused. At most ``size`` members exist.
- The hot path is one non-blocking ``write`` and one ``read`` per job on the member's own
  pipes, watched by the event loop (no stream objects, no task per call): a pooled job costs
  the worker tens of microseconds, not hundreds (``bench workers``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec

_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
_encode = msgspec.json.Encoder().encode


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
        self._reply: asyncio.Future[int | None] | None = None
        self._open = True
        self._loop.add_reader(replies, self._readable)

    def call(self, request: dict[str, Any]) -> asyncio.Future[int | None]:
        """Send a job; a future of its exit code, or None when the interpreter ended instead."""
        fut: asyncio.Future[int | None] = self._loop.create_future()
        self.jobs += 1
        if not self._open:
            fut.set_result(None)
            return fut
        self._reply = fut
        self._write(_encode(request) + b"\n")
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
            fut, self._reply = self._reply, None
            if fut is not None and not fut.done():
                try:
                    fut.set_result(int(line))
                except ValueError:  # not our protocol: treat the member as broken
                    fut.set_result(None)

    def _ended(self) -> None:
        self.close()
        fut, self._reply = self._reply, None
        if fut is not None and not fut.done():
            fut.set_result(None)

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


class PyPool:
    def __init__(self, size: int, max_jobs: int = 1000) -> None:
        self.size = size
        self.max_jobs = max_jobs
        self.idle: list[Member] = []
        self.members = 0
        self._free = asyncio.Semaphore(size)
        self._reaping: set[asyncio.Task[Any]] = set()

    async def acquire(self) -> Member:
        await self._free.acquire()
        while self.idle:
            m = self.idle.pop()
            if m.proc.returncode is None:
                return m
            m.close()
            self.members -= 1
        try:
            return await self._start()
        except BaseException:
            self._free.release()
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

    def release(self, member: Member, healthy: bool) -> None:
        if healthy and member.proc.returncode is None and member.jobs < self.max_jobs:
            self.idle.append(member)
        else:
            self.members -= 1
            member.kill()
            task = asyncio.ensure_future(member.proc.wait())  # reap it
            self._reaping.add(task)
            task.add_done_callback(self._reaping.discard)
        self._free.release()

    async def close(self) -> None:
        for m in self.idle:
            m.kill()
        for m in self.idle:
            await m.proc.wait()
        self.idle.clear()
