"""Running: ``scheduler``, ``worker`` and the all-in-one ``demo``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

import typer

from agents.ops.cli.common import ConfigOpt, JsonOpt, app, emit, err, out, settings_of


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
    jobs: Annotated[int, typer.Option(min=1, max=1_000_000, help="Jobs in the burst")] = 2000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker slots")] = 8,
    keep: Annotated[
        bool, typer.Option("--keep", help="leave the scheduler and its status page running")
    ] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Run everything in one process (embedded broker and PostgreSQL unless configured) and
    show what jobstream does: a burst, workflows with a failure, fairness, a rate limit,
    time, dead letters; a summary of each part."""
    from agents.ops.demo import run_demo

    s = settings_of(config)
    started = time.monotonic()

    def announce(url: str | None) -> None:
        if as_json:
            return
        if url:
            err.print(f"[bold]status page[/]: {url}  (live while the demo runs)")
        else:
            err.print("the demo is done; the status page stays up until Ctrl-C")

    summary = run_demo(
        s, jobs=jobs, slots=workers, show_progress=not as_json, keep=keep, announce=announce
    )
    summary.setdefault("wall_s", round(time.monotonic() - started, 3))
    if as_json:
        emit(summary, True)
    else:
        from rich.table import Table

        table = Table("part", "what happened", title="jobstream demo", show_lines=True)
        for part, sentence in summary.get("story", {}).items():
            table.add_row(part, sentence)
        services = ", ".join(f"{k}: {v}" for k, v in summary.get("services", {}).items())
        table.add_row(
            "in all",
            f"{summary.get('jobs', 0):,} jobs, {summary.get('lost', '?')} lost; the story took "
            f"{summary.get('story_s', '?')} s ({services})",
        )
        if summary.get("error"):
            table.add_row("error", str(summary["error"]))
        out.print(table)
    if summary.get("lost", 0) or summary.get("error"):
        raise typer.Exit(1)
