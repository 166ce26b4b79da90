"""One settings object for every process: defaults ← optional YAML file ← environment.

    JOBSTREAM_CONFIG=/etc/jobstream.yaml      the file (optional)
    JOBSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:9092  any field, upper-cased, with the prefix
    JOBSTREAM_KINDS='{"noop": {"command": ["true"]}}'   structured fields take JSON

Invariants:
- Validation happens once, at start-up, and a failure names the field and what is wrong
  (:class:`ConfigError`); nothing reads ``os.environ`` for configuration anywhere else.
- Secrets (the database password, ``sasl.password``, ``ssl.key.password`` …) never appear in
  ``redacted()`` output, logs or events.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import yaml
from msgspec import Meta, Struct

from agents.errors import ConfigError

if TYPE_CHECKING:
    from agents.core.lifecycle import Backoff

PREFIX = "JOBSTREAM_"
ENTRYPOINT = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"
LABEL = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$"  # no "_": it joins labels in topic names
# names of settings whose values are secret: passwords, tokens, private keys (``ssl.key.pem``
# holds the key itself), credentials
_SECRET_KEY = re.compile(r"pass(word)?|secret|token|key$|key\.pem|credential", re.I)


class KindConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How a job kind runs: exactly one of ``command`` (an argv template: each item may
    contain ``{name}`` placeholders filled from the job's args and ``{job_id}``,
    ``{attempt}``, ``{tenant}``; no command interpreter is involved) or ``entrypoint``
    (``module:function``, called with the job's args as keyword arguments in a child
    interpreter)."""

    command: Annotated[list[str], Meta(min_length=1)] | None = None
    entrypoint: Annotated[str, Meta(pattern=ENTRYPOINT)] | None = None
    timeout_s: Annotated[float, Meta(gt=0)] = 3600.0
    max_attempts: Annotated[int, Meta(ge=1, le=100)] = 3
    retry_backoff_s: Annotated[float, Meta(ge=0, le=86_400)] = 1.0  # attempt n waits b·2^(n-1)
    retry_backoff_max_s: Annotated[float, Meta(ge=0, le=86_400)] = 300.0
    env: dict[str, str] = msgspec.field(default_factory=dict)
    cwd: str | None = None
    max_concurrency: Annotated[int, Meta(ge=1)] | None = None  # FOSSology's per-agent ``max``
    resources: list[str] = msgspec.field(default_factory=list)  # named resources, 1 each
    exclusive: str | None = None  # a resource name or "*": runs alone in that scope
    # FOSSology's flags: nokill = never killed for liveness (no timeout, drain waits for it);
    # local = runs only on a worker on the scheduler's host; labels = runs only on workers
    # that carry every one of them (host pinning, GPUs, licences)
    nokill: bool = False
    local: bool = False
    labels: Annotated[list[Annotated[str, Meta(pattern=LABEL)]], Meta(max_length=8)] = (
        msgspec.field(default_factory=list)
    )


class LimitConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """At most ``limit`` admissions per ``window_s`` per key of ``scope``; ``match`` picks
    one tenant / kind / ``tenant/kind``, or ``*`` for each one on its own."""

    scope: Literal["tenant", "kind", "tenant_kind", "global"]
    limit: Annotated[int, Meta(ge=1, le=10**9)]
    window_s: Annotated[float, Meta(gt=0, le=30 * 86400)]
    match: str = "*"


class ScheduleConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A periodic schedule (``agents.core.schedules``): at each tick of ``cron`` in the time
    zone ``tz``, one job of ``kind`` with ``args`` for ``tenant``, its id
    ``schedule:NAME:<tick>``. Missed ticks (older than ``grace_s`` when seen) follow
    ``catch_up``; ``overlap = "skip"`` runs one at a time."""

    cron: str
    kind: str
    tz: str = "UTC"
    tenant: str = "default"
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    priority: Annotated[int, Meta(ge=-20, le=20)] = 0
    catch_up: Literal["all", "latest", "none"] = "latest"
    overlap: Literal["skip", "allow"] = "allow"
    grace_s: Annotated[float, Meta(gt=0, le=30 * 86400)] = 60.0


DEFAULT_KINDS: dict[str, KindConfig] = {
    "noop": KindConfig(command=["true"], timeout_s=60, max_attempts=1),
    "echo": KindConfig(command=["echo", "{message}"], timeout_s=60),
    "sleep": KindConfig(command=["sleep", "{seconds}"], timeout_s=600),
    "fail": KindConfig(command=["false"], timeout_s=60, max_attempts=1),
}


class Settings(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    kafka_bootstrap: str | None = None
    kafka_config: dict[str, str] = msgspec.field(default_factory=dict)
    database_url: str | None = None
    db_pool_size: Annotated[int, Meta(ge=1, le=100)] = 4
    topics_file: str | None = None
    topic_prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]*$")] = ""
    app_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]+$")] = "jobstream"
    kinds: dict[str, KindConfig] = msgspec.field(default_factory=lambda: dict(DEFAULT_KINDS))
    max_payload_bytes: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 256 * 1024
    max_workflow_bytes: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 900 * 1024
    dependency_grace_s: Annotated[float, Meta(gt=0)] = 86_400.0
    allow_cross_tenant_deps: bool = False
    batch_size: Annotated[int, Meta(ge=1, le=10_000)] = 500
    batch_wait_s: Annotated[float, Meta(ge=0, le=5)] = 0.0
    # a batch of job starts alone waits this long for more events: a short job's outcome
    # then shares its start's transaction instead of waiting behind it
    start_hold_s: Annotated[float, Meta(ge=0, le=1)] = 0.005
    reconcile_interval_s: Annotated[float, Meta(gt=0)] = 15.0
    reconcile_after_s: Annotated[float, Meta(gt=0)] = 10.0
    worker_slots: Annotated[int, Meta(ge=1, le=1024)] = 4
    # how workers take dispatches (docs/workers.md): a consumer group (partitions owned by
    # one worker each) or a Kafka share group (KIP-932: any number of workers per
    # partition); schedulers and workers must agree
    worker_dispatch: Literal["group", "share"] = "group"
    worker_id: str | None = None
    heartbeat_interval_s: Annotated[float, Meta(gt=0)] = 3.0
    # a worker's Kafka sends (job events, offset commits) per second before they batch
    worker_sends_per_s: Annotated[float, Meta(ge=1, le=100_000)] = 100.0
    worker_start_sends_per_s: Annotated[float, Meta(ge=1, le=1_000_000)] = 500.0
    # a warm interpreter is replaced once it grew past this (checked every 50 jobs), or,
    # when set, after this many jobs (0: no count)
    worker_pool_max_rss_mb: Annotated[float, Meta(ge=16)] = 512.0
    worker_pool_max_jobs: Annotated[int, Meta(ge=0)] = 0
    kill_grace_s: Annotated[float, Meta(ge=0)] = 5.0
    drain_grace_s: Annotated[float, Meta(ge=0)] = 30.0
    log_dir: str = "var/logs"
    # admission control (docs/admission.md): limits, priority, fair share, semaphores, capacity
    rate_limits: list[LimitConfig] = msgspec.field(default_factory=list)
    # periodic schedules by name (also added at run time: ``jobstream schedule add``)
    schedules: dict[str, ScheduleConfig] = msgspec.field(default_factory=dict)
    resources: dict[str, Annotated[int, Meta(ge=1)]] = msgspec.field(default_factory=dict)
    tenant_weights: dict[str, Annotated[float, Meta(gt=0, le=1000)]] = msgspec.field(
        default_factory=dict
    )
    max_wait_s: Annotated[float, Meta(gt=0)] = 300.0
    priority_weight: Annotated[float, Meta(ge=0, le=1)] = 0.7
    size_ref: Annotated[int, Meta(ge=1)] = 1 << 30
    capacity_factor: Annotated[float, Meta(ge=1, le=100)] = 2.0
    # in-flight capacity in expected work (``agents.core.depth``): a job whose kind runs
    # shorter than this takes only its share of a slot (0: every job a whole slot)
    inflight_horizon_s: Annotated[float, Meta(ge=0, le=3600)] = 0.25
    worker_lost_after_s: Annotated[float, Meta(gt=0)] = 15.0
    # a scheduler process silent this long leaves its consumer group: its partitions (its
    # dependency groups, tenants, the control topic) move to a surviving one (the broker
    # accepts 6 s and more; faust's own default, 60 s, stalled a killed scheduler's
    # partitions for a minute)
    scheduler_session_timeout_s: Annotated[float, Meta(ge=6, le=300)] = 10.0
    admission_batch: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    admission_resync_s: Annotated[float, Meta(gt=0)] = 15.0
    log_level: str = "WARNING"
    trace_file: str | None = None  # per-job stage timestamps (agents.trace); off when unset
    worker_labels: Annotated[list[Annotated[str, Meta(pattern=LABEL)]], Meta(max_length=6)] = (
        msgspec.field(default_factory=list)
    )
    scheduler_host: str | None = None  # where ``local`` kinds run; default: this host
    # metrics (docs/metrics.md): udp://host:port (Telegraf socket_listener) or an HTTP /write URL
    metrics_url: Annotated[str, Meta(pattern=r"^(udp|https?)://[^\s]+$")] | None = None
    metrics_interval_s: Annotated[float, Meta(gt=0, le=3600)] = 5.0
    # the status page (docs/operations.md): host:port ("" turns it off); a token is required
    # when the address is not loopback
    status_bind: str = "127.0.0.1:8088"
    status_token: str | None = None
    # the host-load brake (docs/metrics.md#the-brake): thresholds, AIMD, staleness
    brake_cpu_busy_pct: Annotated[float, Meta(gt=0, le=100)] = 90.0
    brake_load_per_cpu: Annotated[float, Meta(gt=0)] = 2.0
    brake_mem_used_pct: Annotated[float, Meta(gt=0, le=100)] = 95.0
    brake_decrease: Annotated[float, Meta(gt=0, lt=1)] = 0.5
    brake_step: Annotated[int, Meta(ge=1)] = 1
    brake_interval_s: Annotated[float, Meta(gt=0)] = 5.0
    brake_stale_after_s: Annotated[float, Meta(gt=0)] = 30.0

    def require_kafka(self) -> str:
        if not self.kafka_bootstrap:
            raise ConfigError("JOBSTREAM_KAFKA_BOOTSTRAP is not set (host:port of a Kafka broker)")
        return self.kafka_bootstrap

    def require_database(self) -> str:
        if not self.database_url:
            raise ConfigError("JOBSTREAM_DATABASE_URL is not set (a PostgreSQL connection URL)")
        return self.database_url

    @property
    def backoff_by_kind(self) -> dict[str, Backoff]:
        from agents.core.lifecycle import Backoff

        return {k: Backoff(c.retry_backoff_s, c.retry_backoff_max_s) for k, c in self.kinds.items()}

    def replace(self, **changes: Any) -> Settings:
        return msgspec.structs.replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with every secret replaced by ``***``."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        if out.get("database_url"):
            out["database_url"] = redact_url(out["database_url"])
        out["kafka_config"] = {
            k: ("***" if is_secret_name(k) else v) for k, v in out["kafka_config"].items()
        }
        if out.get("status_token"):
            out["status_token"] = "***"
        for kind in out["kinds"].values():
            kind["env"] = {k: ("***" if is_secret_name(k) else v) for k, v in kind["env"].items()}
        return out


def redact_url(url: str) -> str:
    """A database URL or conninfo string with its password replaced by ``***``: the URL's
    user info (``postgresql://u:secret@h``), a ``password=`` query parameter, and the
    key/value form (``host=h password=secret``, also quoted)."""
    url = re.sub(r"(://[^:/@?#]+:)[^@]*@", r"\1***@", url)
    url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url, flags=re.I)
    return re.sub(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']\S*)", r"\1***", url, flags=re.I)


def is_secret_name(name: str) -> bool:
    """Whether a setting or environment variable of this name holds a secret."""
    return bool(_SECRET_KEY.search(name))


def mask_secrets(text: str, env: Mapping[str, str]) -> str:
    """``text`` with the values of ``env``'s secret-named entries replaced by ``***`` (what a
    job printed of its secrets must not travel in its failure event)."""
    for name, value in env.items():
        if len(value) >= 4 and is_secret_name(name):
            text = text.replace(value, "***")
    return text


_FIELDS = {f.name: f for f in msgspec.structs.fields(Settings)}
_STRUCTURED = {
    "kafka_config",
    "kinds",
    "rate_limits",
    "resources",
    "schedules",
    "tenant_weights",
    "worker_labels",
}


def load_settings(
    environ: Mapping[str, str] | None = None, file: str | Path | None = None, **overrides: Any
) -> Settings:
    """Build and validate the settings; raise :class:`ConfigError` saying what is wrong."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}  # top-level setting → where its value came from
    _warn_unknown_variables(env)
    path = file or env.get(PREFIX + "CONFIG")
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"the config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"the config file {path} must hold a mapping of settings")
        data.update(loaded or {})
        origin.update({k: f"in {path}" for k in loaded or {}})
    for name in _FIELDS:
        raw = env.get(PREFIX + name.upper())
        if raw is None or raw == "":
            continue
        if name == "worker_labels" and not raw.lstrip().startswith("["):
            data[name] = [x.strip() for x in raw.split(",") if x.strip()]
        elif name in _STRUCTURED:
            try:
                data[name] = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{PREFIX}{name.upper()} must be JSON: {exc}") from None
        else:
            data[name] = raw
        origin[name] = f"{PREFIX}{name.upper()}={_shown(name, raw)}"
    data.update({k: v for k, v in overrides.items() if v is not None})
    origin.update({k: "as an option" for k, v in overrides.items() if v is not None})
    if "kinds" in data and isinstance(data["kinds"], dict):
        merged: dict[str, Any] = {k: msgspec.to_builtins(v) for k, v in DEFAULT_KINDS.items()}
        merged.update(data["kinds"])
        data["kinds"] = merged
        for kind, cfg in data["kinds"].items():  # each kind on its own: the error names it
            try:
                msgspec.convert(cfg, KindConfig, strict=False)
            except msgspec.ValidationError as exc:
                where = origin.get("kinds", "")
                raise ConfigError(
                    f"invalid kind {kind!r}{f' ({where})' if where else ''}: {exc}"
                ) from None
    try:
        settings = msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_invalid(exc, origin)) from None
    for kind in settings.kinds:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", kind):
            raise ConfigError(f"invalid kind name {kind!r}: use lower-case letters, digits, _.-")
    for name, kind_cfg in settings.kinds.items():
        if (kind_cfg.command is None) == (kind_cfg.entrypoint is None):
            raise ConfigError(
                f"kind {name!r} needs exactly one of command (an argv list) or entrypoint "
                "(module:function)"
            )
        for r in [*kind_cfg.resources, *([kind_cfg.exclusive] if kind_cfg.exclusive else [])]:
            if r != "*" and r not in settings.resources:
                raise ConfigError(
                    f"kind {name!r} uses the resource {r!r}, which is not in resources "
                    f"(configured: {', '.join(sorted(settings.resources)) or 'none'})"
                )
    if settings.schedules:
        check_schedules(settings)
    for name in settings.resources:
        if name in ("*", "slots") or name.startswith("kind:"):
            raise ConfigError(f"resource name {name!r} is reserved")
    if settings.status_bind:
        host, sep, port = settings.status_bind.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"status_bind {settings.status_bind!r}: expected host:port")
        if host not in ("127.0.0.1", "localhost", "::1", "[::1]") and not settings.status_token:
            raise ConfigError(
                f"status_bind {settings.status_bind!r} is not loopback: set status_token "
                "(JOBSTREAM_STATUS_TOKEN) so the page is not open to everyone"
            )
    if settings.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(f"invalid log_level {settings.log_level!r}")
    return settings


def check_schedules(settings: Settings) -> None:
    """Every schedule's name, expression, zone, kind and arguments, or a ConfigError."""
    from agents.core.command import missing_args
    from agents.core.schedules import Cron, ScheduleError, check_name

    for name, sched in settings.schedules.items():
        try:
            check_name(name)
            Cron(sched.cron, sched.tz)
        except ScheduleError as exc:
            raise ConfigError(f"schedule {name!r}: {exc}") from None
        kind = settings.kinds.get(sched.kind)
        if kind is None:
            raise ConfigError(
                f"schedule {name!r}: unknown kind {sched.kind!r}; known: "
                f"{', '.join(sorted(settings.kinds))}"
            )
        missing = missing_args(kind.command, sched.args)
        if missing:
            raise ConfigError(
                f"schedule {name!r}: kind {sched.kind!r} needs the argument(s) {', '.join(missing)}"
            )


# variables of the prefix that are not settings: a job's environment, the scripts', the tests'
_OTHER_VARIABLES = {"CONFIG", "JOB_ID", "ATTEMPT", "TENANT", "PROGRESS_FILE", "RUN", "CACHE"}
_OTHER_PREFIXES = ("TEST_", "BENCH_", "STATE_", "KAFKA_BOOTSTRAP_TEST")


def _warn_unknown_variables(env: Mapping[str, str]) -> None:
    """Warn (once per name) of ``JOBSTREAM_*`` variables that set nothing, with the closest
    setting's variable: a typo would otherwise be ignored in silence."""
    for var in env:
        if not var.startswith(PREFIX) or var in _WARNED:
            continue
        name = var[len(PREFIX) :]
        if name.lower() in _FIELDS or name in _OTHER_VARIABLES or name.startswith(_OTHER_PREFIXES):
            continue
        _WARNED.add(var)
        close = difflib.get_close_matches(name.lower(), _FIELDS, n=1)
        hint = f"; did you mean {PREFIX}{close[0].upper()}?" if close else ""
        logging.getLogger("jobstream.settings").warning(
            "%s is not a setting and is ignored%s", var, hint
        )


_WARNED: set[str] = set()


def _shown(name: str, raw: str) -> str:
    """A value as an error message may show it: secrets never, long values cut."""
    if is_secret_name(name) or name in ("database_url", "kafka_config", "status_token"):
        return "…"
    return repr(raw if len(raw) <= 60 else raw[:57] + "...")


def _invalid(exc: msgspec.ValidationError, origin: Mapping[str, str]) -> str:
    """msgspec's message (``… - at `$.field…` ``) with where the field's value came from."""
    m = re.search(r"`\$\.([a-z_]+)", str(exc))
    where = origin.get(m.group(1), "") if m else ""
    return f"invalid setting: {exc}" + (f" ({where})" if where else "")
