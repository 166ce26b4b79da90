"""Running one job attempt as a real subprocess: argv from the kind's template (no command
interpreter), output streamed to a per-job log file, timeout with SIGTERM → grace → SIGKILL.

Invariants:
- Job fields reach the process only as argv items and never through a command interpreter.
- The child runs in its own process group, so a timeout or cancel reaches its children too.
- ``run_attempt`` always returns an outcome (never raises for a bad job): a missing argument
  or command is a non-retryable failure, a non-zero exit or a timeout a retryable one, a
  cancel a non-retryable one, a log that cannot be written (a full disk, a file where the
  directory goes) a retryable one; a log directory removed since first use is made again.
- A Python entry point runs in its own child interpreter (``agents.pycall``), with the job's
  args as JSON on stdin: a job that hangs, crashes or leaks cannot touch the worker loop, and
  timeouts, cancel and SIGSTOP/SIGCONT work the same as for commands.
- ``prepare`` (what running a dispatch needs) and ``outcome_of`` (how its process ended)
  are synchronous: the worker's hot path runs a pooled job with them and no task
  (``agents.worker.execute``); ``run_attempt`` awaits the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from agents.core.command import TemplateError, render_argv
from agents.settings import KindConfig, mask_secrets
from agents.worker.handle import AttemptHandle, signal_group, wake
from agents.worker.pypool import PyPool
from streams.events import Dispatch

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    exit_code: int | None
    error: str
    duration_s: float
    log_path: str | None
    retryable: bool


def file_safe(name: str) -> str:
    """``name`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return _SAFE.sub("_", name)


def log_path(log_dir: str, d: Dispatch) -> str:
    """``<log_dir>/<tenant>/<job id, made file-safe>-<hash>.<attempt>.log`` (a string: hot,
    once per job)."""
    digest = hashlib.sha256(d.job_id.encode()).hexdigest()[:10]
    return f"{_tenant_dir(log_dir, d.tenant)}/{file_safe(d.job_id)[:80]}-{digest}.{d.attempt}.log"


@lru_cache(maxsize=4096)
def _tenant_dir(log_dir: str, tenant: str) -> str:
    """A tenant's log directory (made by whoever opens a log in it and finds it missing)."""
    return os.path.join(log_dir, file_safe(tenant))


def open_log(path: str) -> int:
    """A descriptor appending to the job's log; its directory is made again when it went
    away since first use (a clean-up, a reaper). Other errors (a full or read-only disk, a
    file where the directory goes) raise ``OSError``: :func:`run_attempt` reports them."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, flags, 0o644)


def tail(path: Path | str, limit: int = 400) -> str | None:
    """The last ``limit`` bytes of a file as text, or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return None


def argv_for(kind: KindConfig, d: Dispatch) -> list[str]:
    if kind.entrypoint is not None:
        return [sys.executable, "-m", "agents.pycall", kind.entrypoint]
    assert kind.command is not None  # settings validation: exactly one of the two
    return render_argv(
        kind.command, d.args, {"job_id": d.job_id, "attempt": d.attempt, "tenant": d.tenant}
    )


@dataclass(slots=True)
class Prepared:
    """An attempt ready to run: where its output and progress go, its environment, its
    time limit (None: none; ``nokill`` kinds are never killed for liveness)."""

    kind: KindConfig
    argv: list[str]
    path: str
    progress: str
    env: dict[str, str]
    limit_s: float | None


def prepare(
    d: Dispatch, kind: KindConfig | None, log_dir: str, progress_dir: Path | str | None
) -> Prepared | Outcome:
    """What running ``d`` needs, or the outcome that it cannot run (an unknown kind, a
    command template the args do not fill). The progress file goes next to the log, or into
    ``progress_dir``, whose owner sweeps it (the worker, once per heartbeat)."""
    if kind is None:
        return Outcome(
            False, None, f"kind {d.kind!r} is not configured on this worker", 0.0, None, False
        )
    try:
        argv = argv_for(kind, d)
    except TemplateError as exc:
        return Outcome(False, None, str(exc), 0.0, None, False)
    path = log_path(log_dir, d)
    stem = path[path.rindex("/") + 1 : -len(".log")]
    progress = (
        f"{path[: -len('.log')]}.progress"
        if progress_dir is None
        else f"{progress_dir}/{stem}.progress"
    )
    env = {
        **kind.env,
        "JOBSTREAM_JOB_ID": d.job_id,
        "JOBSTREAM_ATTEMPT": str(d.attempt),
        "JOBSTREAM_TENANT": d.tenant,
        "JOBSTREAM_PROGRESS_FILE": progress,
    }
    limit_s = None if kind.nokill else (d.timeout_s or kind.timeout_s)
    return Prepared(kind, argv, path, progress, env, limit_s)


def pooled_request(d: Dispatch, p: Prepared) -> dict[str, Any]:
    """The line a pool member reads for ``d`` (``agents.pycall --serve``)."""
    return {
        "entrypoint": p.kind.entrypoint,
        "args": d.args,
        "log": p.path,
        "env": p.env,
        "cwd": p.kind.cwd,
    }


def outcome_of(
    p: Prepared,
    rc: int | None,
    reason: str | None,
    error: str | None,
    duration: float,
    h: AttemptHandle,
) -> Outcome:
    """The attempt's outcome from how its process ended: ``reason`` it was stopped
    (timeout, cancel: retryable unless cancelled), an ``error`` starting it (not retryable),
    else its exit code (non-zero: retryable, with the log's tail, secrets masked; a Python
    entry point that cannot be imported or called, exit 2, is not)."""
    if error is not None:
        return Outcome(False, None, error, duration, p.path, False)
    if reason is not None:
        return Outcome(False, rc, reason, duration, p.path, not h.stopped)
    if rc == 0:
        return Outcome(True, 0, "", duration, p.path, False)
    end = tail(p.path)
    msg = f"exit code {rc}" + (f": {mask_secrets(end, p.kind.env)}" if end else "")
    unusable = p.kind.entrypoint is not None and rc == 2
    return Outcome(False, rc, msg, duration, p.path, not unusable)


def host_trouble(exc: OSError, h: AttemptHandle) -> Outcome:
    """The log cannot be written, no process can be made: this host's trouble, not the
    job's, so another attempt (maybe elsewhere) may succeed."""
    return Outcome(
        False, None, f"the worker could not run the job: {exc}", 0.0, None, not h.stopped
    )


async def run_attempt(
    d: Dispatch,
    kind: KindConfig | None,
    *,
    log_dir: str,
    kill_grace_s: float,
    handle: AttemptHandle | None = None,
    pool: PyPool | None = None,
    progress_dir: Path | None = None,
) -> Outcome:
    """Run one attempt: a command as a subprocess, or a Python entry point in a warm pool
    member (a one-off child interpreter without a pool). The progress file is removed at
    the end unless it went into ``progress_dir``."""
    start = time.monotonic()
    h = handle or AttemptHandle()
    if h.stopped:  # cancelled or handed back before its process was made: none is
        return Outcome(False, None, h.reason or "cancelled", 0.0, None, True)
    p = prepare(d, kind, log_dir, progress_dir)
    if isinstance(p, Outcome):
        return p
    h.progress_path = p.progress
    try:
        if p.kind.entrypoint is not None and pool is not None:
            rc, reason, error = await _run_pooled(pool, d, p, h, kill_grace_s)
        else:
            rc, reason, error = await _run_process(d, p, h, kill_grace_s)
    except OSError as exc:
        return host_trouble(exc, h)
    if progress_dir is None:
        try:
            os.unlink(p.progress)
        except OSError:
            pass
    return outcome_of(p, rc, reason, error, time.monotonic() - start, h)


async def _run_process(
    d: Dispatch, p: Prepared, h: AttemptHandle, kill_grace_s: float
) -> tuple[int | None, str | None, str | None]:
    """(exit code, reason it was stopped, error starting it)."""
    argv, kind = p.argv, p.kind
    env = {**os.environ, **p.env}
    stdin_data = None
    if kind.entrypoint is not None:
        stdin_data = json.dumps(d.args, ensure_ascii=False).encode()
        env["PYTHONPATH"] = python_path(kind.env)
    # the child gets its own copy of the log's descriptor; the worker keeps none open
    log = open_log(p.path)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin_data is not None else asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=kind.cwd,
            start_new_session=True,
        )
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        return None, None, f"cannot start {argv[0]!r}: {exc.strerror}"
    finally:
        os.close(log)
    h.attach(proc)
    if stdin_data is not None and proc.stdin is not None:
        try:
            proc.stdin.write(stdin_data)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            proc.stdin.close()
    reason = await _wait(asyncio.ensure_future(proc.wait()), h, p.limit_s)
    if reason is not None:
        await stop_group(proc, h, kill_grace_s)
    return proc.returncode, reason, None


async def _run_pooled(
    pool: PyPool, d: Dispatch, p: Prepared, h: AttemptHandle, kill_grace_s: float
) -> tuple[int | None, str | None, str | None]:
    member = await pool.acquire()
    h.attach(member.proc)
    healthy = False
    try:
        reply = member.ask(pooled_request(d, p))
        reason = await _wait(reply, h, p.limit_s)
        if reason is not None:
            await stop_group(member.proc, h, kill_grace_s)
            return member.proc.returncode, reason, None
        rc = reply.result()
        if rc is None:  # the interpreter died under the job (os._exit, a crash, OOM kill)
            rc = await member.proc.wait()
            return rc, None, None if rc else "the Python job's interpreter ended unexpectedly"
        healthy = True
        return rc, None, None
    finally:
        h.detach()
        pool.release(member, healthy)


async def stop_group(proc: asyncio.subprocess.Process, h: AttemptHandle, grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL after ``grace_s``; wait for the end of the job's
    process and of what it left running in its group."""
    h.resume()
    signal_group(proc, signal.SIGTERM)
    waiter = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.wait_for(asyncio.shield(waiter), grace_s)
    except TimeoutError:
        signal_group(proc, signal.SIGKILL)
        await waiter
    await _clear_group(proc.pid)


async def _clear_group(pgid: int, bound_s: float = 1.0) -> None:
    """SIGKILL whatever is left in the job's process group (a background child that ignored
    SIGTERM) until the group is empty: killed processes that are not ours to reap die
    asynchronously. Bounded, since an exited child waits for its new parent to reap it."""
    deadline = time.monotonic() + bound_s
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.02)


def python_path(kind_env: dict[str, str]) -> str:
    """The project root first, so ``agents.pycall`` and the jobs' modules import."""
    extra = kind_env.get("PYTHONPATH") or os.environ.get("PYTHONPATH")
    return os.pathsep.join(x for x in (_PROJECT_ROOT, extra) if x)


async def _wait(done: asyncio.Future[Any], h: AttemptHandle, limit_s: float | None) -> str | None:
    """Wait for ``done`` (the process ended, the pool member answered); the reason to stop
    the attempt instead (timeout, not counting paused time; cancel), or None.

    One future per wake-up, woken by ``done``, by ``h.cancel`` or by a timer (no helper
    tasks: this runs once per job)."""
    loop = asyncio.get_running_loop()
    began = time.monotonic()
    while True:
        if done.done():
            return None
        if h.stopped:
            return h.reason or "cancelled"
        left = None
        if limit_s is not None:
            paused = h.paused_total + (
                time.monotonic() - h.paused_since if h.paused_since is not None else 0.0
            )
            left = limit_s - (time.monotonic() - began - paused)
            if left <= 0 and h.paused_since is None:
                return f"timed out after {limit_s:g} s"
            left = max(0.05, min(left, 1.0)) if h.paused_since is None else 1.0
        waiter: asyncio.Future[None] = loop.create_future()
        h._waiter = waiter
        woken = partial(wake, waiter)
        done.add_done_callback(woken)
        timer = None if left is None else loop.call_later(left, wake, waiter)
        try:
            await waiter
        finally:
            h._waiter = None
            done.remove_done_callback(woken)
            if timer is not None:
                timer.cancel()
