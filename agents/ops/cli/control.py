"""Steering: ``pause``, ``resume``, ``priority``, ``limit``, ``cancel``, ``retry`` (commands on
``jobs.control``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from agents.errors import ConfigError, JobstreamError
from agents.ops.cli.common import (
    ConfigOpt,
    JsonOpt,
    app,
    emit,
    job_states,
    out,
    publisher,
    settings_of,
)
from streams.events import Control, control_problem, encode


def _control(config: Path | None, cmd: Control, as_json: bool, done: str) -> None:
    s = settings_of(config)
    if cmd.scope == "job" and cmd.name and s.database_url:
        reason = impossible(cmd, job_states(s, [cmd.name]).get(cmd.name))
        if reason is not None:
            raise JobstreamError(reason)
    with publisher(s) as pub:
        pub.send_raw("jobs.control", encode(cmd), (cmd.name or cmd.scope).encode())
    emit(msgspec.to_builtins(cmd), True) if as_json else out.print(done)


def impossible(cmd: Control, state: str | None) -> str | None:
    """Why a command on one job can never do anything, checked before it is sent: the job
    does not exist, or it succeeded (no command changes a success). A command that may apply
    once another one lands (a retry sent right after a cancel) is sent."""
    if state is None:
        return f"no job {cmd.name!r}"
    if state == "succeeded" and cmd.action in ("cancel", "retry", "priority"):
        return f"job {cmd.name!r} already succeeded: {cmd.action} changes nothing"
    return None


def _scope(tenant: str | None, kind: str | None, job_id: str | None) -> tuple[str, str]:
    given = [(n, v) for n, v in (("tenant", tenant), ("kind", kind), ("job", job_id)) if v]
    if len(given) != 1:
        raise ConfigError("give exactly one of --tenant, --kind or --job")
    return given[0]


@app.command(rich_help_panel="Steer")
def pause(
    tenant: Annotated[str | None, typer.Option(help="pause every job of this tenant")] = None,
    kind: Annotated[str | None, typer.Option(help="pause every job of this kind")] = None,
    job_id: Annotated[
        str | None, typer.Option("--job", help="pause one job (SIGSTOP if it is running)")
    ] = None,
    reason: str = "",
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop admitting a tenant's, a kind's or a job's jobs. A running job named with --job is
    stopped in place (SIGSTOP, as FOSSology does) until resumed; other running jobs go on."""
    scope, name = _scope(tenant, kind, job_id)
    cmd = _cmd(action="pause", scope=scope, name=name, reason=reason)
    _control(config, cmd, as_json, f"pause of {scope} [bold]{name}[/] sent")


@app.command(rich_help_panel="Steer")
def resume(
    tenant: Annotated[str | None, typer.Option(help="resume a paused tenant")] = None,
    kind: Annotated[str | None, typer.Option(help="resume a paused kind")] = None,
    job_id: Annotated[str | None, typer.Option("--job", help="resume a paused job")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Admit a paused tenant's, kind's or job's jobs again (SIGCONT a paused running job)."""
    scope, name = _scope(tenant, kind, job_id)
    cmd = _cmd(action="resume", scope=scope, name=name)
    _control(config, cmd, as_json, f"resume of {scope} [bold]{name}[/] sent")


@app.command(rich_help_panel="Steer")
def priority(
    job_id: str,
    value: Annotated[int, typer.Argument(min=-20, max=20, help="-20 (last) .. 20 (first)")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a waiting or queued job's priority."""
    cmd = _cmd(action="priority", scope="job", name=job_id, priority=value)
    _control(config, cmd, as_json, f"priority {value} for [bold]{job_id}[/] sent")


@app.command(rich_help_panel="Steer")
def limit(
    scope: Annotated[str, typer.Argument(help="tenant | kind | tenant_kind | global")],
    match: Annotated[str, typer.Argument(help="a tenant, kind, tenant/kind, or * for each")] = "*",
    per: Annotated[int | None, typer.Option("--limit", help="admissions per window")] = None,
    window: Annotated[float | None, typer.Option(help="window in seconds")] = None,
    remove: Annotated[bool, typer.Option(help="remove the run-time limit")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set (or --remove) a sliding-window rate limit at run time."""
    if not remove and (per is None or window is None):
        raise ConfigError("give --limit N and --window SECONDS, or --remove")
    cmd = _cmd(
        action="limit",
        scope=scope,
        name=match,
        limit=None if remove else per,
        window_s=None if remove else window,
    )
    what = "removed" if remove else f"set to {per} per {window:g} s"
    _control(config, cmd, as_json, f"rate limit {scope} {match} {what}")


@app.command(rich_help_panel="Steer")
def cancel(
    job_id: str,
    reason: Annotated[str, typer.Option(help="why; kept on the job and in its history")] = "",
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a job: not started if queued, stopped if running (SIGTERM, grace, SIGKILL).
    Its dependents are handled by their trigger rule (all_success: failed; all_done: run)."""
    cmd = _cmd(action="cancel", scope="job", name=job_id, reason=reason)
    _control(config, cmd, as_json, f"cancel of [bold]{job_id}[/] sent")


@app.command(rich_help_panel="Steer")
def retry(job_id: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Give a failed or cancelled job another attempt; dependents it failed wait again."""
    cmd = _cmd(action="retry", scope="job", name=job_id)
    _control(config, cmd, as_json, f"retry of [bold]{job_id}[/] sent")


def _cmd(**fields: Any) -> Control:
    """A control command, validated like the agent will validate it."""
    fields.update(by=os.environ.get("USER", "") or "cli", at=time.time())
    try:
        cmd = msgspec.convert(fields, Control)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid command: {exc}") from None
    reason = control_problem(cmd)
    if reason:
        raise ConfigError(reason)
    return cmd
