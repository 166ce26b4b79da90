"""Periodic schedules at run time: ``schedule add|list|pause|resume|remove``.

A schedule added here is kept in PostgreSQL beside those the settings file declares; every
scheduler's ticker sees a change within a second. ``add`` of an existing name changes it (its
progress is kept)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from agents.errors import ConfigError, JobstreamError
from agents.ops.cli.common import (
    ConfigOpt,
    JsonOpt,
    app,
    emit,
    name_values,
    out,
    query,
    settings_of,
    table,
)
from agents.settings import ScheduleConfig, Settings, check_schedules

schedule_app = typer.Typer(help="Periodic schedules: a job at each tick of a cron expression.")
app.add_typer(schedule_app, name="schedule", rich_help_panel="Control")


@schedule_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The schedule's name (its jobs' ids start with it)")],
    kind: Annotated[str, typer.Argument(help="Job kind, as configured in kinds.")],
    cron: Annotated[
        str,
        typer.Option(
            "--cron",
            help='"0 2 * * *" (minute hour day month weekday), or six fields with seconds last',
        ),
    ],
    tz: Annotated[str, typer.Option("--tz", help="IANA time zone, e.g. Europe/Berlin")] = "UTC",
    tenant: Annotated[str, typer.Option(help="Tenant of the jobs.")] = "default",
    arg: Annotated[list[str] | None, typer.Option("--arg", "-a", help="NAME=VALUE")] = None,
    priority: Annotated[int, typer.Option(min=-20, max=20)] = 0,
    catch_up: Annotated[
        str, typer.Option("--catch-up", help="missed ticks after an outage: all, latest, none")
    ] = "latest",
    overlap: Annotated[
        str, typer.Option(help="allow, or skip a tick while the previous run is going")
    ] = "allow",
    grace: Annotated[
        float, typer.Option("--grace", min=0.001, help="a tick older than this (s) was missed")
    ] = 60.0,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a schedule, or change the one of that name."""
    from agents.scheduler.ticker import spec_of

    s = settings_of(config)
    if catch_up not in ("all", "latest", "none"):
        raise ConfigError(f"--catch-up {catch_up!r}: all, latest or none")
    if overlap not in ("allow", "skip"):
        raise ConfigError(f"--overlap {overlap!r}: allow or skip")
    cfg = ScheduleConfig(
        cron=cron,
        kind=kind,
        tz=tz,
        tenant=tenant,
        args=name_values(arg),
        priority=priority,
        catch_up=catch_up,  # type: ignore[arg-type]
        overlap=overlap,  # type: ignore[arg-type]
        grace_s=grace,
    )
    check_schedules(Settings(kinds=s.kinds, schedules={name: cfg}))  # the settings' checks
    created = query(config, lambda store: store.put_schedule(name, spec_of(cfg), time.time()))
    if as_json:
        emit({"name": name, "created": created}, True)
    else:
        out.print(f"schedule [bold]{name}[/] {'added' if created else 'changed'}: {cron} ({tz})")


def _row(r: Any) -> dict[str, Any]:
    from agents.core.schedules import Cron

    nxt = None
    if not r.paused:
        ticks = Cron(r.cron, r.tz).ticks(
            max(r.last_tick, time.time()), time.time() + 400 * 86400, 1
        )
        nxt = ticks[0] if ticks else None
    return {
        "name": r.name,
        "cron": r.cron,
        "tz": r.tz,
        "job": r.job,
        "catch_up": r.catch_up,
        "overlap": r.overlap,
        "grace_s": r.grace_s,
        "paused": r.paused,
        "origin": r.origin,
        "last_tick": r.last_tick,
        "last_job": r.last_job,
        "next_tick": nxt,
        "submitted": r.submitted,
        "skipped": r.skipped,
    }


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z" if t else "—"


@schedule_app.command("list")
def list_(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every schedule: expression, zone, job, next tick, counts."""
    rows = [_row(r) for r in query(config, lambda store: store.schedules())]
    if as_json:
        emit(rows, True)
        return
    t = table(
        "name", "cron", "tz", "job", "next tick", "submitted", "skipped", "state", whole=("name",)
    )
    for r in rows:
        t.add_row(
            r["name"],
            r["cron"],
            r["tz"],
            f"{r['job']['kind']} ({r['job']['tenant']})",
            _when(r["next_tick"]),
            str(r["submitted"]),
            str(r["skipped"]),
            "paused" if r["paused"] else f"running ({r['origin']})",
        )
    out.print(t)


def _change(name: str, config: Any, as_json: bool, what: str, fn: Any) -> None:
    if not query(config, fn):
        raise JobstreamError(f"no schedule {name!r}")
    emit({"name": name, what: True}, True) if as_json else out.print(f"schedule {name} {what}")


@schedule_app.command("pause")
def pause(name: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Stop submitting ticks (they are not submitted later: resume goes on from then)."""
    _change(name, config, as_json, "paused", lambda st: st.pause_schedule(name, True, time.time()))


@schedule_app.command("resume")
def resume(name: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Submit ticks again, from now."""
    _change(
        name, config, as_json, "resumed", lambda st: st.pause_schedule(name, False, time.time())
    )


@schedule_app.command("remove")
def remove(name: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Delete a schedule (its jobs stay); one the settings file declares comes back when a
    scheduler starts with it."""
    _change(name, config, as_json, "removed", lambda st: st.remove_schedule(name))
