"""``jobstream demo``: the whole path in one process, with a sample workload.

Submits ``jobs`` valid jobs plus a few malformed events (to show dead-lettering), runs the
scheduler agents and a worker in this process, waits until every accepted job is terminal,
and returns a summary. ``lost`` counts accepted jobs without a terminal state at the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import statistics
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import faust
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agents.context import Context
from agents.scheduler.app import build_app
from agents.settings import Settings
from agents.store import PostgresJobStore
from agents.store.embedded import with_services
from agents.worker import Worker
from streams.events import JobSpec
from streams.publisher import JobPublisher

log = logging.getLogger("jobstream.demo")
TERMINAL = ("succeeded", "failed", "cancelled")
BAD_EVENTS: list[bytes] = [
    b"{not json",
    b'{"type":"job.submitted","v":1,"job":{"id":"bad-type","tenant":"t","kind":"noop",'
    b'"priority":"high"},"submitted_at":1}',
    b'{"type":"job.submitted","v":1,"job":{"id":"bad-kind","tenant":"t",'
    b'"kind":"no-such-kind"},"submitted_at":1}',
]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 2)


def sample_jobs(run: str, n: int, kind: str) -> list[JobSpec]:
    tenants = ["acme", "globex", "initech", "umbrella"]
    args: dict[str, Any] = {"message": "hello", "seconds": "0.01"}
    return [
        JobSpec(
            id=f"demo-{run}-{i}",
            tenant=tenants[i % len(tenants)],
            kind=kind,
            args=args,
            size=(i * 7919) % 10_000,
        )
        for i in range(n)
    ]


async def wait_until_assigned(app: faust.App, worker: Worker, timeout_s: float) -> None:
    """Wait until the agents and the worker own partitions: joining a consumer group for the
    first time on a fresh broker takes seconds, which is not what the demo measures."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.assigned.is_set() and app.consumer.assignment():
            return
        await asyncio.sleep(0.1)
    log.warning("consumers not assigned after %.0f s; going on", timeout_s)


async def drive(
    app: faust.App,
    ctx: Context,
    *,
    jobs: int,
    slots: int,
    kind: str,
    bad: int,
    show_progress: bool,
    timeout_s: float,
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    specs = sample_jobs(run, jobs, kind)
    ids = [j.id for j in specs]
    worker = Worker(ctx, slots=slots)
    worker_task = asyncio.create_task(worker.run())
    store = await ctx.store()
    await wait_until_assigned(app, worker, 120.0)
    dead_before = await store.dead_letter_count()
    started = time.monotonic()

    def publish() -> None:
        with JobPublisher(
            ctx.settings.require_kafka(), registry=ctx.registry, extra=ctx.settings.kafka_config
        ) as pub:
            for i in range(0, len(specs), 1000):
                pub.submit_many(specs[i : i + 1000])
            for raw in BAD_EVENTS[:bad]:
                pub.send_raw("jobs.independent", raw, b"bad")

    publisher = threading.Thread(target=publish, name="demo-publisher")
    publisher.start()
    counts: dict[str, int] = {}
    progress = Progress(
        TextColumn("[bold]jobs"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[states]}"),
        TimeElapsedColumn(),
        disable=not show_progress,
        transient=False,
    )
    with progress:
        task = progress.add_task("run", total=jobs, states="")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            counts = await store.state_counts(ids)
            done = sum(counts.get(s, 0) for s in TERMINAL)
            progress.update(
                task, completed=done, states=" ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            )
            dead = await store.dead_letter_count() - dead_before
            if done >= jobs and not publisher.is_alive() and dead >= bad:
                break
            await asyncio.sleep(0.1)
    elapsed = time.monotonic() - started
    publisher.join()
    worker.request_stop()
    await worker_task
    to_start, to_finish = await store.latencies_ms(ids)
    counts = await store.state_counts(ids)
    accepted = sum(counts.values())
    terminal = sum(counts.get(s, 0) for s in TERMINAL)
    return {
        "submitted": jobs + bad,
        "accepted": accepted,
        "succeeded": counts.get("succeeded", 0),
        "failed": counts.get("failed", 0),
        "cancelled": counts.get("cancelled", 0),
        "dead_lettered": await store.dead_letter_count() - dead_before,
        "lost": accepted - terminal,
        "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(terminal / elapsed, 1) if elapsed > 0 else None,
        "submit_to_start_ms": {"p50": percentile(to_start, 50), "p99": percentile(to_start, 99)},
        "submit_to_finish_ms": {"p50": percentile(to_finish, 50), "p99": percentile(to_finish, 99)},
    }


def run_demo(
    settings: Settings,
    *,
    jobs: int,
    slots: int,
    kind: str,
    bad: int = 3,
    show_progress: bool = True,
    timeout_s: float = 600.0,
    state_dir: Path | None = None,
) -> dict[str, Any]:
    state_dir = state_dir or Path(os.environ.get("JOBSTREAM_STATE_DIR", "var/demo"))
    result: dict[str, Any] = {}
    with ExitStack() as stack:
        settings, used = with_services(settings, stack, state_dir)
        if settings.log_dir == "var/logs":
            settings = settings.replace(log_dir=str(state_dir / "logs"))

        async def migrate() -> None:
            async with PostgresJobStore(settings.require_database()) as store:
                await store.migrate()

        asyncio.run(migrate())
        ctx = Context.from_settings(settings)
        app = build_app(ctx)

        @app.task  # type: ignore[untyped-decorator]
        async def driver() -> None:
            try:
                result.update(
                    await drive(
                        app,
                        ctx,
                        jobs=jobs,
                        slots=slots,
                        kind=kind,
                        bad=bad,
                        show_progress=show_progress,
                        timeout_s=timeout_s,
                    )
                )
            except Exception as exc:
                log.exception("demo failed")
                result["error"] = repr(exc)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # faust's graceful shutdown path

        worker = faust.Worker(
            app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False, stdout=sys.stderr
        )
        try:
            worker.execute_from_commandline()
        except SystemExit:
            pass
        result["services"] = used
    return result
