"""Submitting: ``submit`` (a job or a workflow file, optionally waiting for the end) and
``workflow show``."""

from __future__ import annotations

import importlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import typer

from agents.core.command import missing_args
from agents.errors import ConfigError
from agents.ops.cli.common import (
    STATE_STYLE,
    ConfigOpt,
    JsonOpt,
    app,
    emit,
    err,
    job_states,
    missing_or_json,
    name_values,
    out,
    publisher,
    query,
    settings_of,
    watch,
    wf_app,
)
from agents.settings import Settings
from streams.errors import InvalidEvent
from streams.events import JobId, JobSpec

if TYPE_CHECKING:
    from agents.store.watch import JobWatch


@app.command(rich_help_panel="Submit")
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
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            help="not before this time: ISO 8601 (2026-12-24T02:00+01:00; no offset: "
            "this machine's zone) or epoch seconds",
        ),
    ] = None,
    in_: Annotated[
        str | None,
        typer.Option("--in", help="not before this long after acceptance: 90, 90s, 5m, 2h, 1d"),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait until done (progress bar); exit 1 if any failed")
    ] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish one job (or a workflow); returns once the broker confirmed it, or with --wait
    once it (all of it) finished."""
    import uuid

    if wait:
        _load_watch_meanwhile()
    s = settings_of(config)
    if workflow is not None:
        ids = _submit_workflow(s, workflow, tenant, as_json and not wait)
        if wait:
            _wait_for(s, ids, as_json)
        return
    if kind is None:
        raise ConfigError("give a KIND, or --workflow FILE")
    if at is not None and in_ is not None:
        raise ConfigError("give --at or --in, not both")
    args = name_values(arg)
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
                "run_at": parse_at(at) if at is not None else None,
                "delay_s": parse_duration(in_) if in_ is not None else None,
            },
            JobSpec,
        )
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"invalid job: {exc}") from None
    if job.kind not in s.kinds:
        raise ConfigError(f"unknown kind {job.kind!r}; known: {', '.join(sorted(s.kinds))}")
    _check_args(s, [job])
    with publisher(s) as pub:
        pub.submit(job)
    if wait:
        _wait_for(s, [job.id], as_json)
        return
    emit({"id": job.id, "submitted": True}, as_json) if as_json else out.print(
        f"submitted [bold]{job.id}[/]"
    )


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``1.5m``, ``2h``, ``1d`` as seconds."""
    t = text.strip().lower()
    unit = t[-1:] if t[-1:] in "smhd" else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise ConfigError(f"--in {text!r}: expected a number with s, m, h or d") from None
    if value < 0:
        raise ConfigError(f"--in {text!r}: a duration is not negative")
    return value * _UNITS[unit]


def parse_at(text: str) -> float:
    """An ISO 8601 time (without an offset: this machine's zone) or epoch seconds."""
    from datetime import datetime

    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ConfigError(
            f"--at {text!r}: expected an ISO 8601 time (2026-12-24T02:00:00+01:00) or epoch seconds"
        ) from None


def _load_watch_meanwhile() -> None:
    """Load PostgreSQL's client while the job is published (the thread runs whenever the main
    one waits on the network): ~75 ms of imports that would otherwise follow the send."""
    threading.Thread(
        target=importlib.import_module, args=("agents.store.watch",), daemon=True
    ).start()


def _wait_for(s: Settings, ids: list[str], as_json: bool, limit_s: float = 86_400) -> None:
    """Poll until every job is terminal; a progress bar on a terminal; exit 1 on failures."""
    deadline = time.monotonic() + limit_s
    with watch(s) as w, _progress(w, len(ids), as_json) as show:
        pause = 0.005
        while True:
            states = w.states(ids)
            show(states)
            if w.ended(states) == len(ids):
                break
            if time.monotonic() > deadline:
                break
            # a short job ends within milliseconds: look soon, then less often
            time.sleep(pause)
            pause = min(0.2, pause * 1.5)
    failed = sorted(j for j, st in states.items() if st in ("failed", "cancelled"))
    if as_json:
        emit({"states": states, "failed": failed}, True)
    else:
        out.print(
            f"{len(ids) - len(failed)} of {len(ids)} succeeded"
            + (f"; [red]failed: {', '.join(failed[:10])}[/]" if failed else "")
        )
    if failed or w.ended(states) < len(ids):
        raise typer.Exit(1)


@contextmanager
def _progress(w: JobWatch, total: int, as_json: bool) -> Iterator[Callable[[dict[str, str]], None]]:
    """A progress bar of the jobs that ended, on a terminal only (rich's progress module is
    loaded only then)."""
    if as_json or not err.is_terminal:
        yield lambda states: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("[bold]waiting[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=err,
    ) as progress:
        task = progress.add_task("", total=total)

        def show(states: dict[str, str]) -> None:
            counts = ", ".join(f"{n} {st}" for st, n in sorted(Counter(states.values()).items()))
            progress.update(task, completed=w.ended(states), description=counts)

        yield show


def load_workflow(path: Path, default_tenant: str) -> tuple[str, list[JobSpec]]:
    """A workflow file (YAML or JSON; its format: docs/concepts.md, "The workflow file")."""
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


def _check_args(s: Settings, jobs: Sequence[JobSpec]) -> None:
    """Each job has the arguments its kind's command names (else it would fail on the
    worker): a usage error naming them."""
    for job in jobs:
        missing = missing_args(s.kinds[job.kind].command, job.args)
        if missing:
            given = " ".join(f"--arg {n}=…" for n in missing)
            raise ConfigError(
                f"job {job.id}: kind {job.kind!r} needs the argument(s) {', '.join(missing)} "
                f"({given})"
            )


def _check_outside_dependencies(s: Settings, wid: str, jobs: Sequence[JobSpec]) -> None:
    """A dependency a workflow names outside itself must be a submitted job (checked when a
    database is configured; the scheduler rejects the job otherwise)."""
    own = {j.id for j in jobs}
    outside = sorted({d for j in jobs for d in j.depends_on} - own)
    if not outside or not s.database_url:
        return
    known = job_states(s, outside)
    unknown = [d for d in outside if d not in known]
    if unknown:
        raise ConfigError(
            f"workflow {wid}: {', '.join(unknown)} is neither a job of the workflow nor a "
            "submitted job (a typo?)"
        )


def _submit_workflow(s: Settings, path: Path, tenant: str, as_json: bool) -> list[str]:
    wid, jobs = load_workflow(path, tenant)
    unknown = sorted({j.kind for j in jobs} - set(s.kinds))
    if unknown:
        raise ConfigError(f"unknown kinds {unknown}; known: {', '.join(sorted(s.kinds))}")
    _check_args(s, jobs)
    _check_outside_dependencies(s, wid, jobs)
    with publisher(s) as pub:
        pub.submit_workflow(wid, jobs)
    if as_json:
        emit({"workflow": wid, "jobs": len(jobs), "submitted": True}, True)
    else:
        out.print(f"submitted workflow [bold]{wid}[/] ({len(jobs)} jobs)")
    return [j.id for j in jobs]


@wf_app.command("show")
def workflow_show(workflow_id: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Render a workflow's DAG with each job's state."""
    from rich.tree import Tree

    rows: list[dict[str, Any]] = query(config, lambda store: store.workflow(workflow_id))
    if missing_or_json(rows, f"no workflow {workflow_id!r}", as_json):
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
