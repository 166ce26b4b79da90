"""``python -m bench queries [--json]``: operators' commands with a million jobs.

Fills a fresh database with ``--rows`` jobs (default 1,000,000: mostly finished, some
waiting, ready and running, 200 tenants, 12 kinds, a history row each) with one
``INSERT … SELECT generate_series``, then times ``jobstream status``, ``jobs`` (first page,
and a filtered page) and ``job ID``: the query alone (in-process, best of 5) and the whole
CLI command as a user runs it (a new Python process each time). Target: each under 1 s.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import psycopg
from rich.progress import Progress

from agents.store import PostgresJobStore
from bench.harness import ROOT, fresh_database


def fill(dsn: str, rows: int, show: bool) -> None:
    steps = 10
    per = rows // steps
    with Progress(disable=not show) as progress, psycopg.connect(dsn, autocommit=True) as conn:
        task = progress.add_task(f"inserting {rows:,} jobs", total=steps)
        for i in range(steps):
            conn.execute(
                """INSERT INTO jobs (id, tenant, kind, state, attempt, submitted_at, accepted_at,
                                     ready_at, dispatched_at, started_at, finished_at, worker,
                                     error, exit_code)
                   SELECT 'job-' || n, 't' || (n %% 200), 'kind' || (n %% 12),
                          CASE WHEN n %% 1000 = 0 THEN 'waiting' WHEN n %% 1000 = 1 THEN 'ready'
                               WHEN n %% 1000 = 2 THEN 'running' WHEN n %% 50 = 3 THEN 'failed'
                               ELSE 'succeeded' END,
                          1, ts, ts, ts, ts + interval '5 ms', ts + interval '10 ms',
                          CASE WHEN n %% 1000 < 3 AND n %% 1000 <> 2 THEN NULL
                               ELSE ts + interval '2 s' END,
                          'w' || (n %% 20),
                          CASE WHEN n %% 50 = 3 THEN 'exit code 1' END,
                          CASE WHEN n %% 50 = 3 THEN 1 ELSE 0 END
                   FROM (SELECT n, now() - make_interval(secs => (%s - n) * 0.05) AS ts
                         FROM generate_series(%s::int, %s::int) AS n) s""",
                (rows, i * per + 1, (i + 1) * per),
            )
            conn.execute(
                """INSERT INTO job_history (job_id, attempt, event, at)
                   SELECT 'job-' || n, 1, 'succeeded', now()
                   FROM generate_series(%s::int, %s::int) n""",
                (i * per + 1, (i + 1) * per),
            )
            progress.update(task, advance=1)
        conn.execute("VACUUM ANALYZE jobs")
        conn.execute("VACUUM ANALYZE job_history")


def best(fn: Any, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(rows: int, show: bool) -> dict[str, Any]:
    with fresh_database(f"benchq{os.getpid()}") as dsn:
        return _run(dsn, rows, show)


def _run(dsn: str, rows: int, show: bool) -> dict[str, Any]:

    async def migrate() -> None:
        async with PostgresJobStore(dsn) as store:
            await store.migrate()

    asyncio.run(migrate())
    fill(dsn, rows, show)
    target = f"job-{rows // 2 + 7}"

    async def timed() -> dict[str, float]:
        out: dict[str, float] = {}
        async with PostgresJobStore(dsn) as store:
            for label, call in (
                ("status", lambda: store.status()),
                ("jobs_first_page", lambda: store.jobs(limit=50)),
                (
                    "jobs_failed_of_a_tenant",
                    lambda: store.jobs(tenant="t3", state="failed", limit=50),
                ),
                ("job_id", lambda: store.job(target)),
            ):
                ts = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    await call()
                    ts.append(time.perf_counter() - t0)
                out[label] = round(min(ts) * 1000, 1)
        return out

    query_ms = asyncio.run(timed())
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    env["JOBSTREAM_DATABASE_URL"] = dsn
    cli_ms = {}
    for label, args in (
        ("status", ["status", "--json"]),
        ("jobs_first_page", ["jobs", "--json"]),
        ("jobs_failed_of_a_tenant", ["jobs", "--tenant", "t3", "--state", "failed", "--json"]),
        ("job_id", ["job", target, "--json"]),
    ):

        def cmd(a: list[str] = args) -> None:
            subprocess.run(
                [sys.executable, "-m", "agents.ops.cli", *a],
                env=env,
                cwd=ROOT,
                check=True,
                capture_output=True,
            )

        cli_ms[label] = round(best(cmd, 3) * 1000, 1)
    startup = round(
        best(
            lambda: subprocess.run(
                [sys.executable, "-m", "agents.ops.cli", "--help"],
                env=env,
                cwd=ROOT,
                check=True,
                capture_output=True,
            ),
            3,
        )
        * 1000,
        1,
    )
    return {
        "scenario": "queries",
        "rows": rows,
        "query_ms": query_ms,
        "cli_ms": cli_ms,
        "cli_startup_ms": startup,
        "target_ms": 1000,
        "meets_target": all(v < 1000 for v in cli_ms.values()),
    }
