"""Looking: ``why``, ``job``, ``jobs``, ``status``, ``workers`` and the dead letters."""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agents.errors import ConfigError

if TYPE_CHECKING:
    from agents.store import PostgresJobStore

from agents.ops.cli.common import (
    STATE_STYLE,
    ConfigOpt,
    JsonOpt,
    app,
    dl_app,
    emit,
    kafka,
    missing_or_json,
    out,
    query,
    settings_of,
    table,
)


@app.command(rich_help_panel="Look")
def why(job_id: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Why a job is where it is: its state, its current gate and what it waits on."""
    from agents.pools import kind_labels

    s = settings_of(config)

    async def lookup(store: PostgresJobStore) -> dict[str, Any] | None:
        first = await store.why(job_id)
        if first is None:
            return None
        labels = sorted(kind_labels(s, first["kind"]))
        row = await store.why(job_id, labels, s.worker_lost_after_s) if labels else first
        if row is not None:
            row["brake"] = await store.brake()
        return row

    row: dict[str, Any] | None = query(config, lookup)
    if missing_or_json(row, f"no job {job_id!r}", as_json) or row is None:
        return
    style = STATE_STYLE.get(row["state"], "white")
    out.print(
        f"[bold]{row['id']}[/] is [{style}]{row['state']}[/]"
        + (f": {row['gate']}" if row["gate"] else "")
        + (f" — {row['error']}" if row["error"] else "")
    )
    if row["gate_until"]:
        wait = row["gate_until"] - time.time()
        why = (row["gate"] or "").split(":", 1)[0] or "gate"
        out.print(f"  may next be admitted in {max(0.0, wait):.2f} s ({why.replace('_', ' ')})")
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
    waits = row["state"] in ("ready", "waiting") and (row["run_after"] or 0) > time.time()
    if waits and row["run_after"] == row["run_at"]:
        at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(row["run_at"]))
        out.print(f"  scheduled: not before {at}, in {row['run_at'] - time.time():.1f} s")
    elif waits:
        out.print(f"  retry backoff: may run in {row['run_after'] - time.time():.1f} s")
    if row["state"] == "dispatched" and (row["not_before"] or 0) > time.time():
        at = time.strftime("%H:%M:%S", time.gmtime(row["not_before"]))
        out.print(
            f"  rate limit held at the start: its worker starts it at {at} UTC, "
            f"in {row['not_before'] - time.time():.2f} s"
        )
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


@app.command(rich_help_panel="Look")
def workers(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List workers: state, slots, load, labels and last heartbeat."""
    rows: list[dict[str, Any]] = query(config, lambda store: store.workers())
    if as_json:
        emit(rows, True)
        return
    shown = table(
        "worker",
        "state",
        "slots used",
        "load",
        "labels",
        "running",
        "last heartbeat",
        whole=("worker", "running"),
    )
    colour = {"running": "green", "draining": "yellow", "lost": "red", "stopped": "dim"}
    for r in rows:
        used = r["slots_total"] - r["slots_free"]
        shown.add_row(
            r["id"],
            f"[{colour.get(r['state'], 'white')}]{r['state']}[/]",
            f"{used}/{r['slots_total']}",
            "" if r["load"] is None else f"{r['load']:.2f}",
            ",".join(r["labels"]),
            str(len(r["running"])),
            f"{r['silent_s']:.0f} s ago",
        )
    out.print(shown)


@app.command(rich_help_panel="Look")
def job(job_id: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show one job: state, attempts, times, history and the tail of its log."""
    row: dict[str, Any] | None = query(config, lambda store: store.job(job_id))
    if row is not None:
        row["log_tail"] = _log_tail(row.get("log_path"))
    if missing_or_json(row, f"no job {job_id!r}", as_json) or row is None:
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for k in (
        "id",
        "tenant",
        "kind",
        "state",
        "gate",
        "run_at",
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


@app.command(rich_help_panel="Look")
def status(
    window: Annotated[float, typer.Option(help="seconds of history for rates")] = 300.0,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queues, rates, workers, gates and the brake at a glance."""
    data: dict[str, Any] = query(config, lambda store: store.status(window))
    if as_json:
        emit(data, True)
        return
    t = data["totals"]
    out.print(
        f"[bold]jobs[/]: {t['waiting']} waiting, {t['ready']} ready, "
        f"{t['dispatched']} dispatched, {t['running']} running · last {window:g} s: "
        f"{data['finished']['succeeded']} succeeded, {data['finished']['failed']} failed, "
        f"{data['jobs_per_s']} jobs/s, ready→start p50 {data['start_latency_ms']['p50']} ms "
        f"p99 {data['start_latency_ms']['p99']} ms"
    )
    if data["queues"]:
        q = table(
            "tenant",
            "kind",
            "waiting",
            "ready",
            "dispatched",
            "running",
            whole=("tenant", "kind"),
            title="queues",
        )
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


@app.command(rich_help_panel="Look")
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

    if state is not None and state not in STATE_STYLE:
        raise ConfigError(f"unknown state {state!r}; one of {', '.join(STATE_STYLE)}")
    when = _since(since)
    rows: list[dict[str, Any]] = query(
        config,
        lambda store: store.jobs(
            tenant=tenant, kind=kind, state=state, since=when, after=after, limit=limit
        ),
    )
    if as_json:
        emit(rows, True)
        return
    shown = table("id", "tenant", "kind", "state", "attempt", "accepted", "gate / error")
    for r in rows:
        shown.add_row(
            r["id"],
            r["tenant"],
            r["kind"],
            f"[{STATE_STYLE.get(r['state'], 'white')}]{r['state']}[/]",
            str(r["attempt"]),
            f"{r['accepted_at']:%Y-%m-%d %H:%M:%S}",
            (r["error"] or r["gate"] or "")[:60],
        )
    out.print(shown)
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

    row: dict[str, Any] | None = query(config, lambda store: store.dead_letter(dl_id))
    if row is not None and as_json:
        row = {**row, **_bytes_field("key", row["key"]), **_bytes_field("value", row["value"])}
    if missing_or_json(row, f"no dead letter {dl_id}", as_json) or row is None:
        return
    for k in ("id", "topic", "partition", "offset", "at", "replayed_at", "reason"):
        out.print(f"[bold]{k}[/]: {row[k]}")
    value = row["value"] or b""
    out.print(f"[bold]value[/] ({len(value)} bytes):")
    out.print(value[:4000].decode("utf-8", "replace"), markup=False, highlight=False)


def _bytes_field(name: str, raw: bytes | None) -> dict[str, Any]:
    """Bytes for JSON: the text when they are UTF-8, else base64, and which one it is."""
    if raw is None:
        return {name: None, f"{name}_encoding": None}
    try:
        return {name: raw.decode("utf-8"), f"{name}_encoding": "text"}
    except UnicodeDecodeError:
        return {name: base64.b64encode(raw).decode(), f"{name}_encoding": "base64"}


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
    from streams.kafka import ConfirmedProducer, Record, producer_config

    s = settings_of(config)
    rows: list[dict[str, Any]] = query(
        config, lambda store: store.dead_letters_to_replay(ids, topic, force)
    )
    if rows:
        producer = ConfirmedProducer(producer_config(kafka(s), s.kafka_config))
        try:
            producer.produce_confirmed(
                [Record(r["topic"], r["value"] or b"", r["key"]) for r in rows], 60
            )
        finally:
            producer.close()
        done = [r["id"] for r in rows]
        query(config, lambda store: store.mark_replayed(done))
    data = {"replayed": [r["id"] for r in rows]}
    if as_json:
        emit(data, True)
    elif rows:
        out.print(f"replayed {len(rows)} dead letters")
    else:
        which = "the ones named were" if ids else "every dead letter was"
        out.print(f"nothing to replay: {which} replayed already (--force replays again)")


@dl_app.command("list")
def deadletter_list(limit: int = 50, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The most recent dead letters with their reasons."""
    rows: list[dict[str, Any]] = query(config, lambda store: store.dead_letters(limit))
    if as_json:
        emit(rows, True)
        return
    shown = table("id", "origin", "bytes", "reason", "at", whole=("id", "origin"))
    for r in rows:
        shown.add_row(
            str(r["id"]),
            f"{r['topic']}[{r['partition']}]@{r['offset']}",
            str(r["bytes"]),
            r["reason"],
            f"{r['at']:%Y-%m-%d %H:%M:%S}",
        )
    out.print(shown)
