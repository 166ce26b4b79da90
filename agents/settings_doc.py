"""The reference table of every setting (``docs/configuration.md``), generated from the
settings object: its fields, their defaults and the meanings below. ``jobstream config doc``
prints it; a test holds the document to it, so the two cannot drift."""

from __future__ import annotations

import msgspec

from agents.settings import PREFIX, Settings

# field → (default as shown, or None to show the object's own; meaning)
MEANINGS: dict[str, tuple[str | None, str]] = {
    "kafka_bootstrap": (
        "unset",
        "`host:port[,host:port]`; unset in `demo` starts the embedded broker",
    ),
    "kafka_config": (
        None,
        "extra librdkafka settings (e.g. `security.protocol`, `sasl.*`, `ssl.*`); secrets are never logged",
    ),
    "database_url": ("unset", "PostgreSQL URL; unset in `demo` starts embedded PostgreSQL"),
    "db_pool_size": (None, "connections per process"),
    "topics_file": ("`topics.yaml` of the source tree", "the topic registry"),
    "topic_prefix": (None, "prepended to every topic name (isolates tests or environments)"),
    "app_id": (None, "consumer group of the agents; workers use `<app_id>.workers`"),
    "kinds": (
        "`noop`, `echo`, `sleep`, `fail`",
        'kind → `{command: [argv template] or entrypoint: "module:function", timeout_s, max_attempts, retry_backoff_s, retry_backoff_max_s, env, cwd, max_concurrency, resources, exclusive, nokill, local, labels}`; merged over the defaults; see [workers.md](workers.md#kinds-the-registry)',
    ),
    "max_payload_bytes": (None, "larger events are dead-lettered"),
    "max_workflow_bytes": (None, "limit of one workflow event (under Kafka's 1 MiB default)"),
    "dependency_grace_s": (None, "a dependency not submitted by then fails its dependents"),
    "allow_cross_tenant_deps": (None, "may a job depend on another tenant's job"),
    "batch_size": (
        None,
        "at most this many events per hot cycle or agent batch; a cycle takes what the consumer has buffered at once",
    ),
    "batch_wait_s": (
        None,
        "the low-rate faust agents take what has arrived, or linger this long for more",
    ),
    "start_hold_s": (
        None,
        "a hot cycle made only of job starts waits this long for more events: a short job's outcome shares its start's transaction (one update instead of two); the `running` state is recorded up to this much later",
    ),
    "reconcile_interval_s": (None, "the safety net's period"),
    "reconcile_after_s": (None, "the age of what the safety net acts on"),
    "worker_slots": (None, "jobs a worker runs at once"),
    "worker_dispatch": (
        None,
        "`group`: each dispatch partition is read by one worker of a consumer group; `share`: workers take dispatches through a Kafka share group (KIP-932, Kafka ≥ 4.2; its client is a preview), so a pool scales past its partition count. Set the same on schedulers and workers ([workers.md](workers.md#share-groups))",
    ),
    "worker_id": (
        "host-pid-random",
        "a fixed id is fine: a restarted worker's old running jobs are retried (`since` in its heartbeat)",
    ),
    "heartbeat_interval_s": (
        None,
        "how often a worker reports its liveness, running jobs and load",
    ),
    "worker_sends_per_s": (
        None,
        "a worker's Kafka sends per second (outcome events, offset commits) before they batch: below it every send goes at once; above it one send per `1/rate` s carries what queued meanwhile ([workers.md](workers.md#slots-backpressure-shutdown))",
    ),
    "worker_start_sends_per_s": (
        None,
        "a worker's sends of `job.started` per second before starts batch (burst: one per slot); above it a slot waits at most `1/rate` s for its start's send",
    ),
    "worker_pool_max_rss_mb": (
        None,
        "a warm Python interpreter (a pool member) is replaced once its resident size passes this (read every 50 jobs)",
    ),
    "worker_pool_max_jobs": (
        None,
        "when set, a pool member is also replaced after this many jobs (0: no count)",
    ),
    "kill_grace_s": (None, "SIGTERM → SIGKILL on timeout or cancel"),
    "drain_grace_s": (None, "how long SIGTERM lets running jobs finish"),
    "log_dir": (None, "per-job log files"),
    "rate_limits": (
        None,
        'list of `{scope: tenant\\|kind\\|tenant_kind\\|global, match: name or "*", limit: N, window_s: W}`; run-time limits (`jobstream limit`) override the same scope and match',
    ),
    "schedules": (
        None,
        "periodic schedules by name: `{cron, kind, tz, tenant, args, priority, catch_up: all\\|latest\\|none, overlap: allow\\|skip, grace_s}` ([concepts.md](concepts.md#time-delayed-jobs-and-schedules)); run-time ones: `jobstream schedule`",
    ),
    "resources": (
        None,
        'named resources and their capacity, e.g. `{"scancode-api": 2}`; jobs and kinds name them',
    ),
    "tenant_weights": (None, "fair-share weight per tenant (default 1)"),
    "max_wait_s": (
        None,
        "the priority formula's span: after this long a job is behind only jobs that waited as long",
    ),
    "priority_weight": (None, "share of explicit priority in the due time (the rest is size)"),
    "size_ref": ("2^30", 'size at which a job counts as "large" in the formula'),
    "capacity_factor": (
        None,
        "admit at most this × the live workers' slots (running + prefetched) of long work",
    ),
    "inflight_horizon_s": (
        None,
        "in-flight capacity in expected work: a job takes its kind's run time's share of a slot, 64 units per this many seconds, at least 1, at most the slot's 64 × `capacity_factor` ([admission.md](admission.md#semaphores-exclusivity-capacity--no-deadlock-no-over-commit)); 0: every job 64 units",
    ),
    "worker_lost_after_s": (
        None,
        "a worker silent this long is declared lost: its slots leave the capacity and its running jobs are retried; also its consumer's `session.timeout.ms` (≥ 6 s)",
    ),
    "scheduler_session_timeout_s": (
        None,
        "a scheduler process silent this long leaves its consumer group and its partitions move to a surviving scheduler (6–300 s)",
    ),
    "admission_batch": (None, "admissions per decision round at most"),
    "admission_resync_s": (
        None,
        "an admission owner re-reads its tenants' ready jobs from PostgreSQL this often",
    ),
    "log_level": (None, "the processes' log level"),
    "trace_file": (
        "unset",
        "per-job stage timestamps appended by every process (`agents/trace.py`); `python -m bench unlock --trace` sets it",
    ),
    "worker_labels": (
        None,
        "labels this worker carries (JSON list or `a,b`; `jobstream worker --labels` adds to it); every worker also carries `host-<hostname>`",
    ),
    "scheduler_host": (
        "this host",
        "where `local` kinds run (workers carrying `host-<scheduler_host>`)",
    ),
    "metrics_url": (
        "unset",
        "`udp://host:port` (Telegraf's socket_listener) or an HTTP `/write` URL ([metrics.md](metrics.md))",
    ),
    "metrics_interval_s": (None, "how often metrics are pushed"),
    "status_bind": (
        None,
        'the status page\'s `host:port` (`""` turns it off; [operations.md](operations.md))',
    ),
    "status_token": (
        "unset",
        "required when `status_bind` is not loopback: `Authorization: Bearer <token>` or `?token=`",
    ),
    "brake_cpu_busy_pct": (
        None,
        "the host-load brake lowers capacity above this CPU use ([metrics.md](metrics.md#the-brake))",
    ),
    "brake_load_per_cpu": (None, "… or above this load average per CPU"),
    "brake_mem_used_pct": (None, "… or above this memory use"),
    "brake_decrease": (None, "the brake's multiplicative decrease per step"),
    "brake_step": (None, "the brake's additive increase per step (slots)"),
    "brake_interval_s": (None, "the brake's step period"),
    "brake_stale_after_s": (None, "telemetry older than this does not count"),
}


def _default(name: str) -> str:
    field = next(f for f in msgspec.structs.fields(Settings) if f.name == name)
    value = field.default_factory() if field.default is msgspec.NODEFAULT else field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict | list):
        return f"`{msgspec.json.encode(value).decode()}`"
    return str(value)


def table() -> str:
    """The markdown table: field, environment variable, default, meaning."""
    rows = ["| field | environment | default | meaning |", "|---|---|---|---|"]
    for f in msgspec.structs.fields(Settings):
        shown, meaning = MEANINGS[f.name]
        default = shown if shown is not None else _default(f.name)
        rows.append(f"| `{f.name}` | `{PREFIX}{f.name.upper()}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"
