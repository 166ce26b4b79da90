"""The faults ``make chaos`` injects (``bench.chaos``), one method each, on a running system
of scheduler and worker processes (``bench.harness.Run``).

Every fault is something that happens to real deployments: processes killed, stopped,
frozen past the liveness bound, killed between a job's start and its commit, clocks off by
30 s, a log disk that cannot be written, events delivered twice or out of order, operators
cancelling and retrying running jobs (also jobs of a worker that is being declared lost).

Workers whose job processes may outlive them (SIGKILL, a freeze past the liveness bound) are
remembered in ``orphaning``: their orphans run on by design (docs/guarantees.md, "Not
promised"), so the resource ledger does not count them.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer

from bench.clockskew import skewed_env
from bench.harness import Run, stop_process
from streams.events import Control, JobSpec, JobStarted, decode, encode
from streams.publisher import JobPublisher

FAULTS = [
    "kill_worker",
    "kill_scheduler",
    "term_worker",
    "stop_worker",
    "stall_worker",
    "clock_step",
    "duplicate_events",
    "reorder_events",
    "cancel_retry",
    "retry_after_lost",
    "kill_after_start",
    "log_disk",
]
WORKER_ARGS = ("worker", "--slots", "4")


class Faults:
    def __init__(
        self,
        run: Run,
        rng: random.Random,
        pub: JobPublisher,
        single: list[JobSpec],
        lost_after_s: float,
    ) -> None:
        self.run, self.rng, self.pub, self.single = run, rng, pub, single
        self.lost_after_s = lost_after_s
        self.schedulers = [run.start("scheduler") for _ in range(2)]
        self.workers = [run.start(*WORKER_ARGS) for _ in range(3)]
        self.orphaning: set[int] = set()  # worker pids whose job processes may outlive them
        self.commands = 0  # cancels and retries sent
        self.extra: list[str] = []  # jobs the faults submitted themselves
        assert run.registry is not None
        self.seen = Consumer(
            {
                "bootstrap.servers": run.bootstrap,
                "group.id": f"{run.name}.chaos",
                "auto.offset.reset": "latest",
                "enable.auto.commit": False,
            }
        )
        self.seen.subscribe([run.registry.name("jobs.events")])
        self.recent: deque[tuple[bytes | None, bytes]] = deque(maxlen=200)

    def close(self) -> None:
        self.seen.close()

    def inject(self, fault: str) -> None:
        self.observe()
        getattr(self, fault)()

    def observe(self, timeout_s: float = 0.0) -> list[Any]:
        """The lifecycle events published since the last look (kept for replays)."""
        out = []
        for m in self.seen.consume(1000, timeout_s):
            if not m.error() and m.value():
                self.recent.append((m.key(), m.value()))
                out.append(m)
        return out

    # -- processes ---------------------------------------------------------------------

    def _replace_worker(self, victim: subprocess.Popen[bytes], **env: str) -> None:
        stop_process(victim, 30)
        self.workers[self.workers.index(victim)] = self.run.start(*WORKER_ARGS, env=env or None)

    def kill_worker(self) -> None:
        victim = self.rng.choice(self.workers)
        self.orphaning.add(victim.pid)
        victim.send_signal(signal.SIGKILL)
        self._replace_worker(victim)

    def term_worker(self) -> None:
        victim = self.rng.choice(self.workers)
        victim.send_signal(signal.SIGTERM)
        self._replace_worker(victim)

    def kill_scheduler(self) -> None:
        victim = self.rng.choice(self.schedulers)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        self.schedulers[self.schedulers.index(victim)] = self.run.start("scheduler")

    def _freeze(self, seconds: float, during: Any = None) -> None:
        """SIGSTOP a worker for ``seconds``; ``during(victim)`` runs while it is frozen."""
        victim = self.rng.choice(self.workers)
        began = time.monotonic()
        if seconds >= self.lost_after_s:
            self.orphaning.add(victim.pid)
        victim.send_signal(signal.SIGSTOP)
        try:
            if during is not None:
                during(victim)
            time.sleep(max(0.0, seconds - (time.monotonic() - began)))
        finally:
            victim.send_signal(signal.SIGCONT)

    def stop_worker(self) -> None:
        """A frozen host, for less than the silence that makes it lost."""
        self._freeze(3)

    def stall_worker(self) -> None:
        """Frozen past the liveness bound and the consumer session: its partitions move, its
        jobs are retried elsewhere, and what it reports when it continues is fenced off."""
        self._freeze(10)

    def clock_step(self) -> None:
        """A worker replaced by one whose wall clock is 30 s behind or ahead (monotonic time
        untouched, like an NTP step)."""
        victim = self.rng.choice(self.workers)
        self._replace_worker(victim, **skewed_env(self.rng.choice([-30.0, 30.0]), self.run.env))

    def kill_after_start(self) -> None:
        """SIGKILL a worker the moment one of its starts is on the broker: before its
        dispatch's offset is committed (paced, ~10 ms), so the dispatch is redelivered to
        the partition's next owner and the monitor retries the attempt too."""
        victim = self.rng.choice(self.workers)
        rows = self.run.query("SELECT id FROM workers WHERE pid = %s", victim.pid)
        ids = {r[0] for r in rows}
        deadline = time.monotonic() + 5
        while ids and time.monotonic() < deadline:
            for m in self.observe(0.05):
                if b"job.started" not in m.value():
                    continue
                started = decode(m.value(), JobStarted)
                if started.worker in ids:
                    deadline = 0  # found: kill now
                    break
        self.orphaning.add(victim.pid)
        victim.send_signal(signal.SIGKILL)
        self._replace_worker(victim)

    # -- events ------------------------------------------------------------------------

    def duplicate_events(self) -> None:
        again = self.rng.sample(list(self.recent), min(20, len(self.recent)))
        self.pub.submit_many(self.rng.sample(self.single, min(20, len(self.single))))
        for key, value in again:
            self.pub.send_raw("jobs.events", value, key)

    def reorder_events(self) -> None:
        for key, value in list(reversed(self.recent))[:20]:
            self.pub.send_raw("jobs.events", value, key)

    # -- operators ---------------------------------------------------------------------

    def _running(self, worker_pid: int | None = None) -> list[str]:
        if worker_pid is None:
            rows = self.run.query("SELECT id FROM jobs WHERE state = 'running' LIMIT 20")
        else:
            rows = self.run.query(
                "SELECT j.id FROM jobs j JOIN workers w ON w.id = j.worker "
                "WHERE j.state = 'running' AND w.pid = %s LIMIT 20",
                worker_pid,
            )
        return [r[0] for r in rows]

    def _cancel_and_retry(self, jobs: list[str]) -> None:
        for job in jobs:
            for action in ("cancel", "retry"):
                cmd = Control(action=action, scope="job", name=job, by="chaos", at=time.time())
                self.pub.send_raw("jobs.control", encode(cmd), job.encode())
                self.commands += 1

    def _some_running(self, limit_s: float = 5.0) -> list[str]:
        """Running jobs; when none runs (the workload is between slices), a 2 s job of the
        fault's own, once it runs (counted in ``extra``)."""
        running = self._running()
        if running:
            return running
        job = f"op{len(self.extra)}"
        self.pub.submit(JobSpec(id=job, tenant="t0", kind="slow"))
        self.extra.append(job)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.run.query("SELECT 1 FROM jobs WHERE id = %s AND state = 'running'", job):
                return [job]
            time.sleep(0.05)
        return self._running()

    def cancel_retry(self) -> None:
        """An operator cancels running jobs and retries them at once."""
        running = self._some_running()
        self._cancel_and_retry(self.rng.sample(running, min(2, len(running))))

    def retry_after_lost(self) -> None:
        """A worker frozen past the liveness bound; while it is being declared lost, an
        operator cancels and retries one of its running jobs."""

        def during(victim: subprocess.Popen[bytes]) -> None:
            time.sleep(self.lost_after_s / 2)
            mine = self._running(victim.pid)
            self._cancel_and_retry(mine[:1])

        self._freeze(self.lost_after_s + 3, during)

    def log_disk(self) -> None:
        """The log disk fails for a few seconds: one tenant's log directory cannot be made
        (a file where it goes); its jobs' attempts fail retryably, then run again."""
        logs = Path(self.run.env["JOBSTREAM_LOG_DIR"])
        tenant = logs / f"t{self.rng.randrange(4)}"
        aside = tenant.with_name(tenant.name + ".aside")
        logs.mkdir(parents=True, exist_ok=True)
        if tenant.exists():
            os.replace(tenant, aside)
        tenant.write_text("not a directory")
        time.sleep(3)
        tenant.unlink()
        if aside.exists():
            os.replace(aside, tenant)
