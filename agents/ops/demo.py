"""``jobstream demo``: the whole system in one process, telling what it does in a minute.

Starts the embedded services unless configured (librdkafka's mock cluster, embedded
PostgreSQL), the scheduler's agents and a worker in this process, then runs the story's
parts one after another (``agents.ops.story``: a burst, FOSSology workflows with a broken
upload, a flooding tenant beside small ones, a rate-limited tenant, a delayed job and a
schedule, malformed events) and returns what each did. ``lost`` counts the story's jobs
without a terminal state at the end. ``keep``: the scheduler, its status page and the worker
run on after the story until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import faust
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agents.context import Context
from agents.ops import story
from agents.ops.demojobs import DEMO_KINDS
from agents.scheduler.app import build_app
from agents.settings import KindConfig, LimitConfig, Settings
from agents.store import PostgresJobStore
from agents.store.embedded import with_services
from agents.worker import Worker
from streams.publisher import JobPublisher

log = logging.getLogger("jobstream.demo")
TERMINAL = story.TERMINAL


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
    app: faust.App, ctx: Context, *, jobs: int, slots: int, show_progress: bool, keep: bool
) -> dict[str, Any]:
    """Run the story's parts; what each did, and the jobs none of them lost."""
    worker = Worker(ctx, slots=slots)
    worker_task = asyncio.create_task(worker.run())
    store = await ctx.store()
    await wait_until_assigned(app, worker, 120.0)
    dead_before = await store.dead_letter_count()
    progress = Progress(
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not show_progress,
    )
    parts: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    s = ctx.settings
    with JobPublisher(s.require_kafka(), registry=ctx.registry, extra=s.kafka_config) as pub:
        st = story.Stage(pub, store, progress, uuid.uuid4().hex[:8])
        with progress:
            parts["burst"] = await story.burst(st, jobs)
            parts["workflows"] = await story.workflows(st)
            parts["fairness"] = await story.fairness(st)
            parts["rate_limit"], parts["time"] = await asyncio.gather(
                story.rate_limit(st), story.timed(st)
            )
            parts["dead_letters"] = await story.dead_letters(st, dead_before)
    elapsed = time.monotonic() - started
    counts = await store.state_counts(st.ids)
    if not keep:
        worker.request_stop()
        await worker_task
    return {
        "parts": parts,
        "story": dict(story.told(parts)),
        "jobs": len(st.ids),
        "succeeded": counts.get("succeeded", 0),
        "failed": counts.get("failed", 0),
        "lost": len(set(st.ids)) - sum(counts.get(x, 0) for x in TERMINAL),
        "dead_lettered": parts["dead_letters"]["dead_lettered"],
        "jobs_per_s": parts["burst"]["jobs_per_s"],
        "story_s": round(elapsed, 2),
    }


def demo_settings(settings: Settings) -> Settings:
    """The story's kinds (Python jobs in the warm pool) and its rate-limited tenant."""
    import msgspec

    kinds = dict(settings.kinds)
    for name, cfg in DEMO_KINDS.items():
        kinds.setdefault(name, msgspec.convert(cfg, KindConfig))
    limit = LimitConfig(
        scope="tenant",
        limit=story.METERED_LIMIT,
        window_s=story.METERED_WINDOW_S,
        match=story.METERED_TENANT,
    )
    return settings.replace(kinds=kinds, rate_limits=[*settings.rate_limits, limit])


def run_demo(
    settings: Settings,
    *,
    jobs: int,
    slots: int,
    show_progress: bool = True,
    keep: bool = False,
    state_dir: Path | None = None,
    announce: Any = None,
) -> dict[str, Any]:
    """Run the story (``drive``) with the services it needs; ``announce(url)`` is told the
    status page's address once the scheduler is up."""
    state_dir = state_dir or Path(os.environ.get("JOBSTREAM_STATE_DIR", "var/demo"))
    result: dict[str, Any] = {}
    with ExitStack() as stack:
        settings, used = with_services(demo_settings(settings), stack, state_dir)
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
            for _ in range(50):  # the page binds at start-up: its address (port 0: chosen)
                if ctx.status_url or not settings.status_bind:
                    break
                await asyncio.sleep(0.1)
            if announce is not None and ctx.status_url:
                announce(ctx.status_url)
            try:
                result.update(
                    await drive(
                        app, ctx, jobs=jobs, slots=slots, show_progress=show_progress, keep=keep
                    )
                )
            except Exception as exc:
                log.exception("demo failed")
                result["error"] = repr(exc)
            if keep and "error" not in result and announce is not None:
                announce(None)  # the story is told: the caller says how to stop
                return
            os.kill(os.getpid(), signal.SIGTERM)  # faust's graceful shutdown path

        # the story is the output: library warnings (a busy machine's late timers, a broker
        # reconnecting) stay out of it unless a level was asked for; errors still show
        level = "ERROR" if settings.log_level.upper() == "WARNING" else settings.log_level
        worker = faust.Worker(
            app, loglevel=level, quiet=True, redirect_stdouts=False, stdout=sys.stderr
        )
        worker.spinner = None  # the story shows its own progress
        try:
            worker.execute_from_commandline()
        except SystemExit:
            pass
        result["services"] = used
        result["status_page"] = ctx.status_url
    return result
