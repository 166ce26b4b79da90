"""A warm pool of child interpreters for Python jobs (``python -m agents.pycall --serve``).

Invariants:
- A member runs one job at a time, in its own process group; the worker loop only writes a
  line and awaits a line, so a job that hangs, crashes or leaks cannot block it.
- A member whose job was stopped (timeout, cancel, hand-back), whose interpreter died, or
  that ran ``max_jobs`` jobs is killed and replaced on demand; only a member that answered
  is reused. At most ``size`` members exist.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class Member:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.jobs = 0

    async def call(self, request: dict[str, Any]) -> int | None:
        """Send a job; its exit code, or None when the interpreter ended instead."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.jobs += 1
        try:
            self.proc.stdin.write(json.dumps(request, ensure_ascii=False).encode() + b"\n")
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return None
        line = await self.proc.stdout.readline()
        if not line:
            return None
        return int(json.loads(line)["rc"])

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


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
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agents.pycall",
            "--serve",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
            cwd=_PROJECT_ROOT,
            start_new_session=True,
        )
        self.members += 1
        return Member(proc)

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
