"""Running one job attempt as a real subprocess: argv from the kind's template, no shell,
output streamed to a per-job log file, timeout with SIGTERM → grace → SIGKILL.

Invariants:
- Job fields reach the process only as argv items and never through a shell.
- The child runs in its own process group, so a timeout or cancel reaches its children too.
- ``run_attempt`` always returns an outcome (never raises for a bad job): a missing argument
  or command is a non-retryable failure, a non-zero exit or a timeout a retryable one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from agents.core.command import TemplateError, render_argv
from agents.settings import KindConfig
from streams.events import Dispatch

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    exit_code: int | None
    error: str
    duration_s: float
    log_path: str | None
    retryable: bool


def log_path_for(log_dir: str, d: Dispatch) -> Path:
    """``<log_dir>/<tenant>/<job id, made file-safe>-<hash>.<attempt>.log``."""
    digest = hashlib.sha256(d.job_id.encode()).hexdigest()[:10]
    name = f"{_SAFE.sub('_', d.job_id)[:80]}-{digest}.{d.attempt}.log"
    return Path(log_dir) / _SAFE.sub("_", d.tenant) / name


def _tail(path: Path, limit: int = 400) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def run_attempt(
    d: Dispatch,
    kind: KindConfig | None,
    *,
    log_dir: str,
    kill_grace_s: float,
    cancel: asyncio.Event | None = None,
) -> Outcome:
    start = time.monotonic()
    if kind is None:
        return Outcome(
            False, None, f"kind {d.kind!r} is not configured on this worker", 0.0, None, False
        )
    try:
        argv = render_argv(
            kind.command, d.args, {"job_id": d.job_id, "attempt": d.attempt, "tenant": d.tenant}
        )
    except TemplateError as exc:
        return Outcome(False, None, str(exc), 0.0, None, False)
    path = log_path_for(log_dir, d)
    path.parent.mkdir(parents=True, exist_ok=True)
    timeout = d.timeout_s or kind.timeout_s
    env = {
        **os.environ,
        **kind.env,
        "JOBSTREAM_JOB_ID": d.job_id,
        "JOBSTREAM_ATTEMPT": str(d.attempt),
    }
    with path.open("ab") as log:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=kind.cwd,
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            return Outcome(
                False,
                None,
                f"cannot start {argv[0]!r}: {exc.strerror}",
                time.monotonic() - start,
                str(path),
                False,
            )
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(cancel.wait()) if cancel else None
        done, _ = await asyncio.wait(
            [f for f in (waiter, stopper) if f],
            timeout=timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        reason = None
        if waiter not in done:
            reason = "cancelled" if stopper in done else f"timed out after {timeout:g} s"
            _signal_group(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), kill_grace_s)
            except TimeoutError:
                _signal_group(proc, signal.SIGKILL)
                await waiter
        if stopper is not None:
            stopper.cancel()
    rc = proc.returncode
    duration = time.monotonic() - start
    if reason is not None:
        return Outcome(False, rc, reason, duration, str(path), reason != "cancelled")
    if rc == 0:
        return Outcome(True, 0, "", duration, str(path), False)
    tail = _tail(path)
    msg = f"exit code {rc}" + (f": {tail}" if tail else "")
    return Outcome(False, rc, msg, duration, str(path), True)
