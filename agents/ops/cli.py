"""The ``jobstream`` command line.

Exit codes: 0 success; 1 the operation failed (a job failed, topics disagree …);
2 bad usage or configuration; 3 a service (Kafka, PostgreSQL) is unreachable.
Every command that prints data takes ``--json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from agents.errors import ConfigError, JobstreamError, StoreUnavailable
from agents.scheduler.control import check as check_control
from agents.settings import Settings, load_settings
from streams.errors import InvalidEvent, KafkaUnavailable, StreamsError
from streams.events import Control, JobId, JobSpec, encode

if TYPE_CHECKING:
    from agents.store import PostgresJobStore

T = TypeVar("T")

app = typer.Typer(
    help="jobstream: a Kafka-driven job scheduler with state in PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
topics_app = typer.Typer(help="Create and check the topics of topics.yaml.")
db_app = typer.Typer(help="Database schema.")
config_app = typer.Typer(help="Configuration.")
dl_app = typer.Typer(help="Dead letters: rejected input with its reason.")
wf_app = typer.Typer(help="Workflows: DAGs of dependent jobs.")
app.add_typer(wf_app, name="workflow")
app.add_typer(topics_app, name="topics")
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(dl_app, name="deadletter")

out = Console()
err = Console(stderr=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Settings file (YAML).")]


def _settings(config: Path | None, **overrides: Any) -> Settings:
    return load_settings(file=config, **overrides)


def _query(config: Path | None, fn: Callable[[PostgresJobStore], Awaitable[T]]) -> T:
    """Open the store, run one query, close it."""
    from agents.store import PostgresJobStore

    s = _settings(config)

    async def run() -> T:
        async with PostgresJobStore(s.require_database()) as store:
            return await fn(store)

    return asyncio.run(run())


def _missing_or_json(row: Any, missing: str, as_json: bool) -> bool:
    """Exit 1 saying ``missing`` when there is no row; with ``--json`` print it and say so."""
    if row is None or row == []:
        err.print(missing)
        raise typer.Exit(1)
    if as_json:
        _emit(row, True)
    return as_json


def _emit(data: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, default=str) + "\n")
    else:
        out.print(data)


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        sys.exit(2)
    except (KafkaUnavailable, StoreUnavailable) as exc:
        err.print(f"[red]service unavailable:[/] {exc}")
        sys.exit(3)
    except (JobstreamError, StreamsError) as exc:
        err.print(f"[red]error:[/] {exc}")
        sys.exit(1)


@config_app.command("check")
def config_check(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Validate the settings and print them with secrets redacted."""
    s = _settings(config)
    _emit(s.redacted(), as_json)


@topics_app.command("apply")
def topics_apply(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Create missing topics; report topics whose partition count differs (exit 1)."""
    _topics(config, as_json, create=True)


@topics_app.command("check")
def topics_check(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Report missing topics and partition-count differences without changing anything."""
    _topics(config, as_json, create=False)


def _topics(config: Path | None, as_json: bool, *, create: bool) -> None:
    from streams.kafka import apply_topics, wait_for_broker
    from streams.topics import load_topics

    s = _settings(config)
    registry = load_topics(s.topics_file, prefix=s.topic_prefix)
    wait_for_broker(s.require_kafka(), s.kafka_config, timeout_s=30)
    report = apply_topics(registry, s.require_kafka(), s.kafka_config, create=create)
    data = {"created": report.created, "existing": report.existing, "mismatched": report.mismatched}
    if as_json:
        _emit(data, True)
    else:
        for name in report.created:
            out.print(f"[green]created[/]  {name}")
        for name in report.existing:
            out.print(f"[dim]exists[/]   {name}")
        for line in report.mismatched:
            out.print(f"[red]differs[/]  {line}")
    if not report.ok:
        raise typer.Exit(1)


@db_app.command("migrate")
def db_migrate(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Apply pending schema migrations (safe to run from several processes at once)."""
    applied: list[str] = _query(config, lambda store: store.migrate())
    _emit({"applied": applied}, as_json) if as_json else out.print(
        f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}"
    )


@app.command()
def submit(
    kind: Annotated[str | None, typer.Argument(help="Job kind, as configured in kinds.")] = None,
    workflow: Annotated[
        Path | None, typer.Option("--workflow", "-w", help="Submit a YAML/JSON DAG file")
    ] = None,
    job_id: Annotated[
        str | None, typer.Option("--id", help="Idempotency key (default: new)")
    ] = None,
    tenant: Annotated[str, typer.Option(help="Tenant (user or project).")] = "default",
    arg: Annotated[list[str] | None, typer.Option("--arg", "-a", help="NAME=VALUE")] = None,
    priority: Annotated[int, typer.Option(min=-20, max=20)] = 0,
    size: Annotated[int, typer.Option(min=0, help="Estimated work, e.g. bytes")] = 0,
    depends_on: Annotated[list[str] | None, typer.Option("--depends-on")] = None,
    group: Annotated[str | None, typer.Option(help="Dependency group key")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds")] = None,
    max_attempts: Annotated[int | None, typer.Option(min=1, max=100)] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait until done (progress bar); exit 1 if any failed")
    ] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish one job (or a workflow); returns once the broker confirmed it, or with --wait
    once it (all of it) finished."""
    import uuid

    from streams.publisher import JobPublisher
    from streams.topics import load_topics

    s = _settings(config)
    if workflow is not None:
        ids = _submit_workflow(s, workflow, tenant, as_json and not wait)
        if wait:
            _wait_for(config, ids, as_json)
        return
    if kind is None:
        raise ConfigError("give a KIND, or --workflow FILE")
    args: dict[str, str] = {}
    for item in arg or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--arg {item!r}: expected NAME=VALUE")
        args[name] = value
    try:
        job = msgspec.convert(
            {
                "id": job_id or f"job-{uuid.uuid4().hex}",
                "tenant": tenant,
                "kind": kind,
                "args": args,
                "priority": priority,
                "size": size,
                "group": group,
                "depends_on": depends_on or [],
                "timeout_s": timeout,
                "max_attempts": max_attempts,
            },
            JobSpec,
        )
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"invalid job: {exc}") from None
    if job.kind not in s.kinds:
        raise ConfigError(f"unknown kind {job.kind!r}; known: {', '.join(sorted(s.kinds))}")
    registry = load_topics(s.topics_file, prefix=s.topic_prefix)
    with JobPublisher(s.require_kafka(), registry=registry, extra=s.kafka_config) as pub:
        pub.submit(job)
    if wait:
        _wait_for(config, [job.id], as_json)
        return
    _emit({"id": job.id, "submitted": True}, as_json) if as_json else out.print(
        f"submitted [bold]{job.id}[/]"
    )


def _wait_for(config: Path | None, ids: list[str], as_json: bool, limit_s: float = 86_400) -> None:
    """Poll until every job is terminal; a progress bar on a terminal; exit 1 on failures."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    terminal = ("succeeded", "failed", "cancelled")
    deadline = time.monotonic() + limit_s

    async def poll() -> dict[str, str]:
        from agents.store import PostgresJobStore

        s = _settings(config)
        async with PostgresJobStore(s.require_database(), max_size=1) as store:
            with Progress(
                TextColumn("[bold]waiting[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                console=err,
                disable=as_json or not err.is_terminal,
            ) as progress:
                task = progress.add_task("", total=len(ids))
                while True:
                    states = await store.job_states(ids)
                    done = sum(1 for st in states.values() if st in terminal)
                    counts = ", ".join(
                        f"{n} {st}" for st, n in sorted(Counter(states.values()).items())
                    )
                    progress.update(task, completed=done, description=counts)
                    if done == len(ids) or time.monotonic() > deadline:
                        return states
                    await asyncio.sleep(0.2)

    states = asyncio.run(poll())
    failed = sorted(j for j, st in states.items() if st in ("failed", "cancelled"))
    if as_json:
        _emit({"states": states, "failed": failed}, True)
    else:
        out.print(
            f"{len(ids) - len(failed)} of {len(ids)} succeeded"
            + (f"; [red]failed: {', '.join(failed[:10])}[/]" if failed else "")
        )
    if failed or len(states) < len(ids) or any(st not in terminal for st in states.values()):
        raise typer.Exit(1)


def load_workflow(path: Path, default_tenant: str) -> tuple[str, list[JobSpec]]:
    """``{id, tenant?, jobs: [{id, kind, args?, depends_on?, ...}]}`` from YAML or JSON."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InvalidEvent(f"{path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise InvalidEvent(f"{path}: expected a mapping with 'id' and a list 'jobs'")
    wid = doc.get("id")
    if not isinstance(wid, str) or not wid:
        raise InvalidEvent(f"{path}: the workflow needs an 'id'")
    try:
        msgspec.convert(wid, JobId)
    except (msgspec.ValidationError, UnicodeError) as exc:
        raise InvalidEvent(f"{path}: workflow id {wid!r}: {exc}") from None
    tenant = doc.get("tenant", default_tenant)
    jobs = []
    for i, raw in enumerate(doc["jobs"]):
        if not isinstance(raw, dict):
            raise InvalidEvent(f"{path}: job {i} must be a mapping")
        try:
            jobs.append(msgspec.convert({"tenant": tenant, "group": wid, **raw}, JobSpec))
        except msgspec.ValidationError as exc:
            raise InvalidEvent(f"{path}: job {i} ({raw.get('id')!r}): {exc}") from None
        except (UnicodeError, TypeError) as exc:  # lone surrogates, non-string keys in YAML
            raise InvalidEvent(f"{path}: job {i} is not valid: {exc}") from None
    return wid, jobs


def _submit_workflow(s: Settings, path: Path, tenant: str, as_json: bool) -> list[str]:
    from streams.publisher import JobPublisher
    from streams.topics import load_topics

    wid, jobs = load_workflow(path, tenant)
    unknown = sorted({j.kind for j in jobs} - set(s.kinds))
    if unknown:
        raise ConfigError(f"unknown kinds {unknown}; known: {', '.join(sorted(s.kinds))}")
    registry = load_topics(s.topics_file, prefix=s.topic_prefix)
    with JobPublisher(
        s.require_kafka(),
        registry=registry,
        extra=s.kafka_config,
        max_workflow_bytes=s.max_workflow_bytes,
    ) as pub:
        pub.submit_workflow(wid, jobs)
    if as_json:
        _emit({"workflow": wid, "jobs": len(jobs), "submitted": True}, True)
    else:
        out.print(f"submitted workflow [bold]{wid}[/] ({len(jobs)} jobs)")
    return [j.id for j in jobs]


STATE_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "red",
    "running": "cyan",
    "dispatched": "cyan",
    "ready": "yellow",
    "waiting": "dim",
}


@wf_app.command("show")
def workflow_show(workflow_id: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Render a workflow's DAG with each job's state."""
    from rich.tree import Tree

    rows: list[dict[str, Any]] = _query(config, lambda store: store.workflow(workflow_id))
    if _missing_or_json(rows, f"no workflow {workflow_id!r}", as_json):
        return
    by_id = {r["id"]: r for r in rows}
    children: dict[str, list[str]] = {}
    for r in rows:
        for d in r["deps"]:
            if d in by_id:
                children.setdefault(d, []).append(r["id"])
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    tree = Tree(
        f"[bold]{workflow_id}[/]  "
        + "  ".join(f"[{STATE_STYLE.get(k, 'white')}]{k} {v}[/]" for k, v in sorted(counts.items()))
    )
    shown: set[str] = set()

    def label(r: dict[str, Any]) -> str:
        style = STATE_STYLE.get(r["state"], "white")
        extra = r["error"] or r["gate"] or ""
        return f"[{style}]{r['state']:<10}[/] {r['id']} [dim]({r['kind']})[/] {extra}"

    def add(node: Any, jid: str) -> None:
        if jid in shown:
            node.add(f"[dim]{jid} (see above)[/]")
            return
        shown.add(jid)
        branch = node.add(label(by_id[jid]))
        for c in children.get(jid, []):
            add(branch, c)

    for r in rows:
        if not any(d in by_id for d in r["deps"]):
            add(tree, r["id"])
    for r in rows:  # jobs only reachable through a cycle
        if r["id"] not in shown:
            add(tree, r["id"])
    out.print(tree)


@app.command()
def why(job_id: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Why a job is where it is: its state, its current gate and what it waits on."""
    from agents.pools import kind_labels

    s = _settings(config)

    async def lookup(store: PostgresJobStore) -> dict[str, Any] | None:
        first = await store.why(job_id)
        if first is None:
            return None
        labels = sorted(kind_labels(s, first["kind"]))
        row = await store.why(job_id, labels, s.worker_lost_after_s) if labels else first
        if row is not None:
            row["brake"] = await store.brake()
        return row

    row: dict[str, Any] | None = _query(config, lookup)
    if _missing_or_json(row, f"no job {job_id!r}", as_json) or row is None:
        return
    style = STATE_STYLE.get(row["state"], "white")
    out.print(
        f"[bold]{row['id']}[/] is [{style}]{row['state']}[/]"
        + (f": {row['gate']}" if row["gate"] else "")
        + (f" — {row['error']}" if row["error"] else "")
    )
    if row["gate_until"]:
        wait = row["gate_until"] - time.time()
        out.print(f"  may next be admitted in {max(0.0, wait):.2f} s (rate limit)")
    for p in row["paused_by"]:
        out.print(
            f"  paused: {p['scope']} {p['name']}" + (f" ({p['reason']})" if p["reason"] else "")
        )
    if row["state"] == "ready" and not row["gate"]:
        out.print(
            f"  queued for admission: {row['ready_ahead']} ready jobs of tenant "
            f"{row['tenant']} became ready before it "
            f"(priority {row['priority']}, size {row['size']})"
        )
    if row["state"] == "ready" and row["run_after"] and row["run_after"] > time.time():
        out.print(f"  retry backoff: may run in {row['run_after'] - time.time():.1f} s")
    if row["state"] in ("running", "dispatched") and row["worker"]:
        w = f"  on worker {row['worker']} ({row['worker_state'] or 'unknown'}"
        if row["worker_silent_s"] is not None:
            w += f", last heartbeat {row['worker_silent_s']:.0f} s ago"
        if row["progress"] is not None:
            w += f", progress {row['progress']:.0%}"
        out.print(w + ")")
    if row.get("pool_workers") == 0 and row["state"] in ("ready", "dispatched"):
        labels = ", ".join(sorted(kind_labels(s, row["kind"])))
        out.print(
            f"  [yellow]no live worker carries the labels {labels}[/]; start one with "
            f"jobstream worker --labels ..."
        )
    brake = row.get("brake")
    if brake and brake["target"] is not None and row["state"] in ("ready", "waiting"):
        out.print(
            f"  brake: slot capacity held at {brake['target']} of {brake['static']} "
            f"({brake['reason']})"
        )
    if row["holds"]:
        out.print("  holds: " + ", ".join(f"{k}={v}" for k, v in row["holds"].items()))
    if row["root_cause"]:
        out.print(f"  root cause: {row['root_cause']}")
    for d in row["dependencies"]:
        need = "must succeed" if d["needs"] == "success" else "must finish"
        out.print(
            f"  {d['edge']:<10} {d['id']}: [{STATE_STYLE.get(d['state'], 'white')}]"
            f"{d['state']}[/] ({need})"
        )


def _control(config: Path | None, cmd: Control, as_json: bool, done: str) -> None:
    from streams.publisher import JobPublisher
    from streams.topics import load_topics

    s = _settings(config)
    registry = load_topics(s.topics_file, prefix=s.topic_prefix)
    with JobPublisher(s.require_kafka(), registry=registry, extra=s.kafka_config) as pub:
        pub.send_raw("jobs.control", encode(cmd), (cmd.name or cmd.scope).encode())
    _emit(msgspec.to_builtins(cmd), True) if as_json else out.print(done)


def _scope(tenant: str | None, kind: str | None, job_id: str | None) -> tuple[str, str]:
    given = [(n, v) for n, v in (("tenant", tenant), ("kind", kind), ("job", job_id)) if v]
    if len(given) != 1:
        raise ConfigError("give exactly one of --tenant, --kind or --job")
    return given[0]


@app.command()
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


@app.command()
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


@app.command()
def priority(
    job_id: str,
    value: Annotated[int, typer.Argument(min=-20, max=20, help="-20 (last) .. 20 (first)")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a waiting or queued job's priority."""
    cmd = _cmd(action="priority", scope="job", name=job_id, priority=value)
    _control(config, cmd, as_json, f"priority of [bold]{job_id}[/] set to {value}")


@app.command()
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


@app.command()
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


@app.command()
def retry(job_id: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Give a failed or cancelled job another attempt; dependents it failed wait again."""
    cmd = _cmd(action="retry", scope="job", name=job_id)
    _control(config, cmd, as_json, f"retry of [bold]{job_id}[/] sent")


@app.command()
def workers(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List workers: state, slots, load, labels and last heartbeat."""
    rows: list[dict[str, Any]] = _query(config, lambda store: store.workers())
    if as_json:
        _emit(rows, True)
        return
    table = Table("worker", "state", "slots used", "load", "labels", "running", "last heartbeat")
    colour = {"running": "green", "draining": "yellow", "lost": "red", "stopped": "dim"}
    for r in rows:
        used = r["slots_total"] - r["slots_free"]
        table.add_row(
            r["id"],
            f"[{colour.get(r['state'], 'white')}]{r['state']}[/]",
            f"{used}/{r['slots_total']}",
            "" if r["load"] is None else f"{r['load']:.2f}",
            ",".join(r["labels"]),
            str(len(r["running"])),
            f"{r['silent_s']:.0f} s ago",
        )
    out.print(table)


def _cmd(**fields: Any) -> Control:
    """A control command, validated like the agent will validate it."""
    fields.update(by=os.environ.get("USER", "") or "cli", at=time.time())
    try:
        cmd = msgspec.convert(fields, Control)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid command: {exc}") from None
    reason = check_control(cmd)
    if reason:
        raise ConfigError(reason)
    return cmd


@app.command()
def job(job_id: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show one job: state, attempts, times, history and the tail of its log."""
    row: dict[str, Any] | None = _query(config, lambda store: store.job(job_id))
    if row is not None:
        row["log_tail"] = _log_tail(row.get("log_path"))
    if _missing_or_json(row, f"no job {job_id!r}", as_json) or row is None:
        return
    table = Table(show_header=False, box=None)
    for k in (
        "id",
        "tenant",
        "kind",
        "state",
        "gate",
        "attempt",
        "max_attempts",
        "worker",
        "exit_code",
        "error",
        "log_path",
        "submitted_at",
        "started_at",
        "finished_at",
    ):
        table.add_row(f"[bold]{k}[/]", "" if row.get(k) is None else str(row[k]))
    out.print(table)
    for h in row["history"]:
        out.print(
            f"  {h['at']:%H:%M:%S.%f}  attempt {h['attempt']}  {h['event']}  "
            f"{json.dumps(h['detail']) if h['detail'] else ''}"
        )
    if row["log_tail"]:
        out.print(f"[bold]log[/] ({row['log_path']}, last lines):")
        out.print(row["log_tail"], markup=False, highlight=False)
    elif row.get("log_path"):
        out.print(f"[dim]log {row['log_path']} is on the worker's host[/]")


def _log_tail(path: str | None, lines: int = 20) -> str | None:
    """The last lines of a job's log when it is readable from here (same host or shared
    storage), else None."""
    from agents.worker.runner import tail

    text = tail(path, 8192) if path else None
    return "\n".join(text.splitlines()[-lines:]) if text is not None else None


@app.command()
def status(
    window: Annotated[float, typer.Option(help="seconds of history for rates")] = 300.0,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queues, rates, workers, gates and the brake at a glance."""
    from agents.store import reads as queries

    data: dict[str, Any] = _query(config, lambda store: queries.status(store, window))
    if as_json:
        _emit(data, True)
        return
    t = data["totals"]
    out.print(
        f"[bold]jobs[/]: {t['waiting']} waiting, {t['ready']} ready, "
        f"{t['dispatched'] + t['running']} running · last {window:g} s: "
        f"{data['finished']['succeeded']} succeeded, {data['finished']['failed']} failed, "
        f"{data['jobs_per_s']} jobs/s, start latency p50 {data['start_latency_ms']['p50']} ms "
        f"p99 {data['start_latency_ms']['p99']} ms"
    )
    if data["queues"]:
        q = Table("tenant", "kind", "waiting", "ready", "dispatched", "running", title="queues")
        for r in data["queues"]:
            q.add_row(
                r["tenant"],
                r["kind"],
                *(str(r[s]) for s in ("waiting", "ready", "dispatched", "running")),
            )
        out.print(q)
    if data["gates"]:
        out.print("gates: " + ", ".join(f"{g} {n}" for g, n in data["gates"].items()))
    live = [w for w in data["workers"] if w["state"] in ("running", "draining")]
    slots = sum(w["slots_total"] for w in live)
    used = sum(w["slots_total"] - w["slots_free"] for w in live)
    lost = sum(1 for w in data["workers"] if w["state"] == "lost")
    out.print(
        f"workers: {len(live)} live ({used}/{slots} slots used)"
        + (f", [red]{lost} lost[/]" if lost else "")
    )
    b = data["brake"]
    if b and b["target"] is not None:
        out.print(f"[yellow]brake[/]: capacity {b['target']} of {b['static']} ({b['reason']})")
    if data["dead_letters_recent"]:
        out.print(
            f"[red]{data['dead_letters_recent']} dead letters[/] in the window "
            "(jobstream deadletter list)"
        )


@app.command()
def jobs(
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
    kind: Annotated[str | None, typer.Option(help="only this kind")] = None,
    state: Annotated[str | None, typer.Option(help="only this state")] = None,
    since: Annotated[
        str | None, typer.Option(help="accepted at or after (ISO time, or e.g. 15m, 2h, 1d)")
    ] = None,
    after: Annotated[str | None, typer.Option(help="next page: the last id shown")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first, with filters and paging (--after LAST_ID)."""
    from agents.store import reads as queries

    if state is not None and state not in STATE_STYLE:
        raise ConfigError(f"unknown state {state!r}; one of {', '.join(STATE_STYLE)}")
    when = _since(since)
    rows: list[dict[str, Any]] = _query(
        config,
        lambda store: queries.jobs(
            store, tenant=tenant, kind=kind, state=state, since=when, after=after, limit=limit
        ),
    )
    if as_json:
        _emit(rows, True)
        return
    table = Table("id", "tenant", "kind", "state", "attempt", "accepted", "gate / error")
    for r in rows:
        table.add_row(
            r["id"],
            r["tenant"],
            r["kind"],
            f"[{STATE_STYLE.get(r['state'], 'white')}]{r['state']}[/]",
            str(r["attempt"]),
            f"{r['accepted_at']:%Y-%m-%d %H:%M:%S}",
            (r["error"] or r["gate"] or "")[:60],
        )
    out.print(table)
    if len(rows) == limit:
        out.print(f"[dim]next page: --after {rows[-1]['id']}[/]")


def _since(text: str | None) -> datetime | None:
    if not text:
        return None
    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if m:
        secs = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return datetime.now(UTC) - timedelta(seconds=secs)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r}: use an ISO time or a duration like 15m") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dl_app.command("show")
def deadletter_show(dl_id: int, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """One dead letter: origin, reason, and the original bytes (as text where possible)."""
    from agents.store import reads as queries

    row: dict[str, Any] | None = _query(config, lambda store: queries.dead_letter(store, dl_id))
    if _missing_or_json(row, f"no dead letter {dl_id}", as_json) or row is None:
        return
    for k in ("id", "topic", "partition", "offset", "at", "replayed_at", "reason"):
        out.print(f"[bold]{k}[/]: {row[k]}")
    value = row["value"] or b""
    out.print(f"[bold]value[/] ({len(value)} bytes):")
    out.print(value[:4000].decode("utf-8", "replace"), markup=False, highlight=False)


@dl_app.command("replay")
def deadletter_replay(
    ids: Annotated[list[int] | None, typer.Argument(help="dead letter ids (default: all)")] = None,
    topic: Annotated[str | None, typer.Option(help="only those from this topic")] = None,
    force: Annotated[bool, typer.Option(help="replay again ones already replayed")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish dead letters again to their original topic, byte for byte (after a fix: a new
    kind, a schema change). Idempotent: replayed ones are skipped unless --force, and intake
    accepts a job id once."""
    from agents.store import reads as queries
    from streams.kafka import ConfirmedProducer, Record, producer_config

    s = _settings(config)
    rows: list[dict[str, Any]] = _query(
        config, lambda store: queries.dead_letters_to_replay(store, ids, topic, force)
    )
    if rows:
        producer = ConfirmedProducer(producer_config(s.require_kafka(), s.kafka_config))
        try:
            producer.produce_confirmed(
                [Record(r["topic"], r["value"] or b"", r["key"]) for r in rows], 60
            )
        finally:
            producer.close()
        done = [r["id"] for r in rows]
        _query(config, lambda store: queries.mark_replayed(store, done))
    data = {"replayed": [r["id"] for r in rows]}
    _emit(data, True) if as_json else out.print(f"replayed {len(rows)} dead letters")


@dl_app.command("list")
def deadletter_list(limit: int = 50, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The most recent dead letters with their reasons."""
    rows: list[dict[str, Any]] = _query(config, lambda store: store.dead_letters(limit))
    if as_json:
        _emit(rows, True)
        return
    table = Table("id", "origin", "bytes", "reason", "at")
    for r in rows:
        table.add_row(
            str(r["id"]),
            f"{r['topic']}[{r['partition']}]@{r['offset']}",
            str(r["bytes"]),
            r["reason"],
            f"{r['at']:%Y-%m-%d %H:%M:%S}",
        )
    out.print(table)


@app.command()
def scheduler(config: ConfigOpt = None) -> None:
    """Run the scheduler's stream agents (intake, admission, outcomes) until stopped."""
    from agents.context import Context
    from agents.scheduler.app import run_scheduler

    s = _settings(config)
    s.require_kafka()
    s.require_database()
    run_scheduler(Context.from_settings(s))


@app.command()
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

    s = _settings(config)
    s.require_kafka()
    logging.basicConfig(
        level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    extra = [x.strip() for x in (labels or "").split(",") if x.strip()]
    if extra:
        s = _settings(config, worker_labels=[*s.worker_labels, *extra])
    ctx = Context.from_settings(s)
    raise typer.Exit(asyncio.run(run_worker(ctx, slots=slots, abort=abort)))


@app.command()
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

    s = _settings(config)
    started = time.monotonic()
    summary = run_demo(s, jobs=jobs, slots=workers, kind=kind, show_progress=not as_json)
    summary.setdefault("wall_s", round(time.monotonic() - started, 3))
    if as_json:
        _emit(summary, True)
    else:
        table = Table("metric", "value", title="jobstream demo")
        for k, v in summary.items():
            table.add_row(k, str(v))
        out.print(table)
    if summary.get("lost", 0) or summary.get("failed", 0):
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
