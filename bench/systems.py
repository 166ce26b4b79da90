"""Three schedulers behind one small interface, so each scenario in ``bench/compare.py`` runs
the same jobs through each of them on the same machine.

- ``Jobstream``: scheduler + worker subprocesses on Kafka and PostgreSQL (``bench.harness.Run``).
- ``CeleryPeer``: a Celery worker on Redis (``scripts/redis.sh``), defaults otherwise.
- ``ProcrastinatePeer``: a procrastinate worker on a fresh PostgreSQL database.

A job is a ``Job``: key, tenant, seconds of work (0: a no-op), size in bytes (jobstream's
"smaller projects first"; the peers have no such notion). Timings come back as dicts:
``k`` key, ``t`` tenant, ``s`` submitted, ``a`` started, ``f`` finished, ``d`` the latest
dependency's finish (workflows), all seconds since the epoch on this machine's clock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from rich.progress import Progress

from bench.harness import ROOT, Run, fresh_database, stop_process
from bench.peers import TimingCounter, read_timings
from bench.workers import _wait_workers
from bench.workflow import SCANNERS, steps
from streams.events import JobSpec
from streams.publisher import JobPublisher

REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:16379")
KINDS = {
    "pynoop": {"entrypoint": "bench.jobs:noop", "timeout_s": 60, "max_attempts": 1},
    "pywork": {"entrypoint": "bench.jobs:work", "timeout_s": 600, "max_attempts": 1},
}


@dataclass(frozen=True, slots=True)
class Job:
    k: str
    t: str = "t0"
    seconds: float = 0.0
    size: int = 0


class System:
    name = ""

    def __init__(self, slots: int, *, rate: str | None = None, tenants: int = 0) -> None:
        self.slots = slots
        self.rate = rate  # "N/Ws": a per-tenant rate limit (the ratelimit scenario)
        self.tenants = tenants
        self.timing_dir = Path(f"/tmp/bench-{self.name}-{uuid.uuid4().hex[:8]}")
        self._stack = ExitStack()
        self._counter = TimingCounter(self.timing_dir)

    def limit(self) -> tuple[int, float]:
        """The per-tenant rate limit ``N/Ws`` as (N, W)."""
        assert self.rate is not None
        limit, window = self.rate.split("/")
        return int(limit), float(window.rstrip("s"))

    def submit(self, jobs: Sequence[Job]) -> None:
        raise NotImplementedError

    def submit_workflows(self, uploads: Sequence[str]) -> None:
        raise NotImplementedError

    def submit_at(self, jobs: Sequence[Job], at: float) -> None:
        """No-op jobs that are not to start before ``at`` (epoch seconds)."""
        raise NotImplementedError

    def completed(self) -> int:
        return self._counter.count()

    def timings(self) -> list[dict[str, Any]]:
        return read_timings(self.timing_dir)

    def wait(self, total: int, show: bool, what: str = "", limit_s: float = 1800) -> float:
        """Block until ``total`` jobs finished (progress bar); the seconds it took."""
        start = time.monotonic()
        with Progress(disable=not show, transient=True) as progress:
            task = progress.add_task(f"{self.name}: {what}", total=total)
            done = 0
            while done < total:
                if time.monotonic() - start > limit_s:
                    raise TimeoutError(f"{self.name}: {done}/{total} finished in {limit_s:.0f} s")
                done = self.completed()
                progress.update(task, completed=done)
                if done < total:
                    time.sleep(0.05)
        return time.monotonic() - start

    def __enter__(self) -> System:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()
        shutil.rmtree(self.timing_dir, ignore_errors=True)

    def _spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start a peer's worker (``python -m ARGV``), its output in ``<timing dir>.log``,
        stopped when the system is left."""
        self.timing_dir.mkdir(parents=True)
        self.log = self.timing_dir.parent / f"{self.timing_dir.name}.log"
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", *argv],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._stack.callback(stop_process, proc, 20)
        return proc

    def _until(self, ready: Any, proc: subprocess.Popen[bytes], limit_s: float = 60) -> None:
        deadline = time.monotonic() + limit_s
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {self.name} worker did not start (log: {self.log})")
            time.sleep(0.1)


class Jobstream(System):
    name = "jobstream"

    def __init__(
        self, slots: int, *, rate: str | None = None, tenants: int = 0, workers: int = 1
    ) -> None:
        super().__init__(slots, rate=rate, tenants=tenants)
        self.workers = workers
        self.run: Run | None = None
        self.extra = {
            k.removeprefix("JOBSTREAM_BENCH_").lower(): v
            for k, v in os.environ.items()
            if k.startswith("JOBSTREAM_BENCH_") and k != "JOBSTREAM_BENCH_PG"
        }

    def __enter__(self) -> Jobstream:
        settings = {"heartbeat_interval_s": "1", "kinds": json.dumps(KINDS), **self.extra}
        if self.rate:
            limit, window_s = self.limit()
            settings["rate_limits"] = json.dumps(
                [{"scope": "tenant", "limit": limit, "window_s": window_s}]
            )
        run = self._stack.enter_context(Run(**settings))
        self.run = run
        run.start("scheduler")
        for _ in range(self.workers):  # its jobs record their end (``bench.jobs``)
            run.start("worker", "--slots", str(self.slots), env=self.timing_env)
        _wait_workers(run, self.workers)
        time.sleep(4)  # the worker group settles (partitions assigned); not measured
        assert run.registry is not None
        self.pub = self._stack.enter_context(JobPublisher(run.bootstrap, registry=run.registry))
        self._conn = self._stack.enter_context(psycopg.connect(run.dsn, autocommit=True))
        return self

    def submit(self, jobs: Sequence[Job]) -> None:
        self.pub.submit_many(
            JobSpec(
                id=j.k,
                tenant=j.t,
                kind="pywork" if j.seconds else "pynoop",
                args={"seconds": j.seconds} if j.seconds else {},
                size=j.size,
            )
            for j in jobs
        )

    def submit_at(self, jobs: Sequence[Job], at: float) -> None:
        self.pub.submit_many(JobSpec(id=j.k, tenant=j.t, kind="pynoop", run_at=at) for j in jobs)

    def submit_workflows(self, uploads: Sequence[str]) -> None:
        for n, u in enumerate(uploads):
            specs = [
                JobSpec(
                    id=f"{u}-{name}",
                    tenant=f"t{n % 4}",
                    kind="pynoop",
                    depends_on=[f"{u}-{d}" for d in deps],
                )
                for name, deps in steps()
            ]
            self.pub.submit_workflow(u, specs)

    @property
    def timing_env(self) -> dict[str, str]:
        return {"BENCH_TIMINGS": str(self.timing_dir)}

    def wait(self, total: int, show: bool, what: str = "", limit_s: float = 1800) -> float:
        """Until ``total`` jobs returned (counted from their records, as for the peers: a
        ``count(*)`` of the jobs table every 50 ms cost PostgreSQL ~10 % of its time during
        a flood), then until PostgreSQL holds all of them as ended (durable state)."""
        start = time.monotonic()
        super().wait(total, show, what, limit_s)
        while self.ended() < total:
            if time.monotonic() - start > limit_s:
                raise TimeoutError(f"{self.name}: {total} jobs not ended in {limit_s:.0f} s")
            time.sleep(0.02)
        return time.monotonic() - start

    def ended(self) -> int:
        row = self._conn.execute(
            "SELECT count(*) FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')"
        ).fetchone()
        return int(row[0]) if row else 0

    def timings(self) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            """SELECT j.id, j.tenant, extract(epoch from j.submitted_at),
                      extract(epoch from j.started_at), extract(epoch from j.finished_at),
                      (SELECT extract(epoch from max(dj.finished_at))
                         FROM job_deps d JOIN jobs dj ON dj.id = d.dep_id
                        WHERE d.job_id = j.id),
                      extract(epoch from j.dispatched_at)
                 FROM jobs j WHERE j.state = 'succeeded'"""
        ).fetchall()
        return [
            {
                "k": r[0],
                "t": r[1],
                "s": float(r[2]),
                "a": float(r[3]),
                "f": float(r[4]),
                "d": None if r[5] is None else float(r[5]),
                "dispatched": float(r[6]),
            }
            for r in rows
        ]

    def admissions(self) -> dict[str, list[float]]:
        """Admission times per tenant from the rate-limit window log (what the limit counts)."""
        out: dict[str, list[float]] = {}
        for key, at in self._conn.execute(
            "SELECT key, at FROM rate_log WHERE key LIKE 'tenant:%%'"
        ).fetchall():
            out.setdefault(key.split(":", 1)[1], []).append(float(at))
        return out


class CeleryPeer(System):
    name = "celery"

    def __enter__(self) -> CeleryPeer:
        import redis

        redis.Redis.from_url(REDIS).flushall()
        env = dict(os.environ, BENCH_TIMINGS=str(self.timing_dir), BENCH_REDIS=REDIS)
        if self.rate:
            limit, window_s = self.limit()
            env.update(BENCH_RATE=f"{limit / window_s:g}/s", BENCH_TENANTS=str(self.tenants))
        from bench.peers import celery_app

        self.app = celery_app.app
        self.mod = celery_app
        self._stack.callback(lambda: redis.Redis.from_url(REDIS).flushall())
        proc = self._spawn(
            [
                "celery",
                "-A",
                "bench.peers.celery_app",
                "worker",
                "-c",
                str(self.slots),
                "-n",
                f"{self.timing_dir.name}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "WARNING",
            ],
            env,
        )
        self._until(lambda: self.app.control.ping(timeout=0.5), proc)
        return self

    def submit(self, jobs: Sequence[Job]) -> None:
        for j in jobs:
            s = time.time()
            if self.rate:  # by name: the limit lives in the worker (BENCH_RATE)
                self.app.send_task(f"limited.{j.t}", (j.k, s))
            elif j.seconds:
                self.mod.work.apply_async((j.k, s, j.seconds, j.t))
            else:
                self.mod.noop.apply_async((j.k, s, j.t))

    def submit_at(self, jobs: Sequence[Job], at: float) -> None:
        from datetime import UTC, datetime

        eta = datetime.fromtimestamp(at, UTC)
        for j in jobs:
            self.mod.noop.apply_async((j.k, time.time(), j.t), eta=eta)

    def submit_workflows(self, uploads: Sequence[str]) -> None:
        from celery import chain, group

        step = self.mod.step
        for u in uploads:
            s = time.time()
            chain(
                step.si(None, k=f"{u}-unpack", u=u, s=s),
                step.s(k=f"{u}-adj2nest", u=u, s=s),
                group(step.s(k=f"{u}-{sc}", u=u, s=s) for sc in SCANNERS),
                step.s(k=f"{u}-report", u=u, s=s),
            ).apply_async()


class ProcrastinatePeer(System):
    name = "procrastinate"

    def __enter__(self) -> ProcrastinatePeer:
        from bench.peers import procrastinate_app

        dsn, self.app = self._stack.enter_context(procrastinate_database())
        self.mod = procrastinate_app
        env = dict(os.environ, BENCH_TIMINGS=str(self.timing_dir), BENCH_PROCRASTINATE_DSN=dsn)
        proc = self._spawn(
            [
                "procrastinate",
                "--app=bench.peers.procrastinate_app.app",
                "worker",
                "-c",
                str(self.slots),
            ],
            env,
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            self._until(
                lambda: conn.execute("SELECT 1 FROM procrastinate_workers LIMIT 1").fetchone(),
                proc,
            )
        return self

    def _defer(self, task: str, kwargs: Iterable[dict[str, Any]]) -> None:
        defer_in_batches(self.app, task, kwargs)

    def submit(self, jobs: Sequence[Job]) -> None:
        s = time.time()
        noops = [{"k": j.k, "s": s, "t": j.t} for j in jobs if not j.seconds]
        works = [{"k": j.k, "s": s, "t": j.t, "seconds": j.seconds} for j in jobs if j.seconds]
        if noops:
            self._defer("noop", noops)
        if works:
            self._defer("work", works)

    def submit_at(self, jobs: Sequence[Job], at: float) -> None:
        from datetime import UTC, datetime

        s = time.time()
        task = self.app.configure_task("noop", schedule_at=datetime.fromtimestamp(at, UTC))
        batch = [{"k": j.k, "s": s, "t": j.t} for j in jobs]
        for i in range(0, len(batch), 1000):
            task.batch_defer(*batch[i : i + 1000])

    def submit_workflows(self, uploads: Sequence[str]) -> None:
        s = time.time()
        self._defer("step", ({"k": f"{u}-unpack", "u": u, "s": s} for u in uploads))


@contextmanager
def procrastinate_database() -> Iterator[tuple[str, Any]]:
    """A fresh database with procrastinate's schema (and the fan-in table of its DAG), and
    an app that defers by task name into it (deferring from another process than the
    worker's needs no task code)."""
    from procrastinate import App, SyncPsycopgConnector
    from procrastinate.schema import SchemaManager

    from bench.peers import procrastinate_app

    with fresh_database(f"bench{uuid.uuid4().hex[:8]}") as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SchemaManager.get_schema())
            conn.execute(procrastinate_app.FANIN_DDL)
        app = App(connector=SyncPsycopgConnector(conninfo=dsn))
        with app.open():
            yield dsn, app


def defer_in_batches(app: Any, task: str, kwargs: Iterable[dict[str, Any]]) -> None:
    batch = list(kwargs)
    for i in range(0, len(batch), 1000):
        app.configure_task(task).batch_defer(*batch[i : i + 1000])


SYSTEMS: dict[str, type[System]] = {
    "jobstream": Jobstream,
    "celery": CeleryPeer,
    "procrastinate": ProcrastinatePeer,
}
