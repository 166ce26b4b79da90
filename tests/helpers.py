"""Shared test helpers: waiting without sleeps, service processes, topic readers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Consumer

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def eventually(
    fn: Callable[[], T], timeout: float = 60.0, interval: float = 0.1, what: str = "condition"
) -> T:
    """Call ``fn`` until it returns a truthy value (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout:.0f} s (last value: {last!r})")


class Proc:
    """A ``jobstream`` subprocess with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self._fh = log.open("ab")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "agents.ops.cli", *args],
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    def signal(self, sig: int) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.p.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9
        finally:
            self._fh.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def read_topic(bootstrap: str, topic: str, *, expect: int, timeout: float = 30.0) -> Iterator[Any]:
    """Read at least ``expect`` messages of ``topic`` from the beginning (a throw-away group)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    c.subscribe([topic])
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < expect and time.monotonic() < deadline:
            for m in c.consume(100, 0.2):
                if not m.error():
                    got.append(m)
    finally:
        c.close()
    return iter(got)


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``jobstream ARGS`` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "agents.ops.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def running(env: dict[str, str], logs: Path, slots: int = 4) -> Iterator[dict[str, Proc]]:
    """A scheduler and a worker as subprocesses, stopped (SIGTERM) on exit."""
    procs = {
        "scheduler": Proc(["scheduler"], env, logs / "scheduler.log"),
        "worker": Proc(["worker", "--slots", str(slots)], env, logs / "worker.log"),
    }
    try:
        yield procs
    finally:
        for p in procs.values():
            p.stop(timeout=20)
