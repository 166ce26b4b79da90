"""Running: ``scheduler``, ``worker`` and the all-in-one ``demo``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

import typer
from rich.table import Table

from agents.ops.cli.common import ConfigOpt, JsonOpt, app, emit, out, settings_of


@app.command(rich_help_panel="Run")
def scheduler(config: ConfigOpt = None) -> None:
    """Run the scheduler's stream agents (intake, admission, outcomes) until stopped."""
    from agents.context import Context
    from agents.scheduler.app import run_scheduler

    s = settings_of(config)
    s.require_kafka()
    s.require_database()
    run_scheduler(Context.from_settings(s))


@app.command(rich_help_panel="Run")
def worker(
    slots: Annotated[int | None, typer.Option(min=1, help="Jobs run at once")] = None,
    labels: Annotated[
        str | None, typer.Option(help="comma-separated labels this worker carries (pools)")
    ] = None,
    abort: Annotated[
        bool,
        typer.Option(
            "--abort", help="On SIGTERM stop at once and hand running jobs back instead of draining"
        ),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Run a worker in the worker consumer group until SIGTERM (drain) or a second signal."""
    from agents.context import Context
    from agents.worker import run_worker

    s = settings_of(config)
    s.require_kafka()
    logging.basicConfig(
        level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    extra = [x.strip() for x in (labels or "").split(",") if x.strip()]
    if extra:
        s = settings_of(config, worker_labels=[*s.worker_labels, *extra])
    ctx = Context.from_settings(s)
    raise typer.Exit(asyncio.run(run_worker(ctx, slots=slots, abort=abort)))


@app.command(rich_help_panel="Run")
def demo(
    jobs: Annotated[int, typer.Option(min=1, max=1_000_000, help="Jobs to run")] = 200,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker slots")] = 8,
    kind: Annotated[str, typer.Option(help="Kind of the sample jobs")] = "noop",
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Run everything in one process (embedded broker and PostgreSQL unless configured),
    submit a sample workload, run it to completion and print a summary."""
    from agents.ops.demo import run_demo

    s = settings_of(config)
    started = time.monotonic()
    summary = run_demo(s, jobs=jobs, slots=workers, kind=kind, show_progress=not as_json)
    summary.setdefault("wall_s", round(time.monotonic() - started, 3))
    if as_json:
        emit(summary, True)
    else:
        table = Table("metric", "value", title="jobstream demo")
        for k, v in summary.items():
            table.add_row(k, str(v))
        out.print(table)
    if summary.get("lost", 0) or summary.get("failed", 0):
        raise typer.Exit(1)
