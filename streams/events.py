"""Event and command types that travel on the topics, and their JSON codec.

Invariants:
- Every message carries ``type`` (a tag) and ``v`` (the schema version); a decoder accepts only
  versions it knows and rejects everything else with a reason (the caller dead-letters it).
- Submissions reject unknown fields, wrong types, out-of-range values, NUL characters (which
  PostgreSQL text and jsonb cannot store) and payloads over the configured size. Nothing in an
  event is ever interpolated into SQL or a command line: fields travel as parameters and argv items.
- Events are past tense (``JobSucceeded``), commands imperative (``Dispatch``).
- Times are float seconds since the Unix epoch, set by the process that observed the moment.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

from streams.errors import InvalidEvent

SCHEMA_VERSION: Final = 1
DEFAULT_MAX_PAYLOAD_BYTES: Final = 256 * 1024
MAX_WORKFLOW_JOBS: Final = 10_000
DEFAULT_MAX_WORKFLOW_BYTES: Final = 900 * 1024  # under Kafka's default 1 MiB message size
MAX_ARGS_DEPTH: Final = 16

# Identifiers are printable, bounded and free of whitespace and control characters.
JobId = Annotated[
    str, Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]*$")
]
Tenant = Annotated[
    str, Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")
]
Kind = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
Label = Annotated[
    str, Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/=-]*$")
]
Priority = Annotated[int, Meta(ge=-20, le=20)]
Size = Annotated[int, Meta(ge=0, le=2**62)]
Timeout = Annotated[float, Meta(gt=0, le=7 * 24 * 3600)]
Attempts = Annotated[int, Meta(ge=1, le=100)]
Epoch = Annotated[float, Meta(ge=0)]
Delay = Annotated[float, Meta(ge=0, le=366 * 24 * 3600)]


class JobSpec(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A job as its submitter describes it. ``id`` is chosen by the client: it is the
    idempotency key, so a resubmission of the same id changes nothing."""

    id: JobId
    tenant: Tenant
    kind: Kind
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    priority: Priority = 0
    size: Size = 0
    group: JobId | None = None
    depends_on: Annotated[list[JobId], Meta(max_length=1000)] = msgspec.field(default_factory=list)
    labels: Annotated[list[Label], Meta(max_length=64)] = msgspec.field(default_factory=list)
    resources: Annotated[list[Label], Meta(max_length=64)] = msgspec.field(default_factory=list)
    timeout_s: Timeout | None = None
    max_attempts: Attempts | None = None
    trigger: Literal["all_success", "all_done"] = "all_success"
    order_key: Label | None = None
    exclusive: Label | Literal["*"] | None = None  # a resource name, or "*": the whole system
    # not before this instant (``run_at``) or this long after acceptance (``delay_s``): the
    # job waits in PostgreSQL, holding nothing, and is admitted then under every other rule
    run_at: Epoch | None = None
    delay_s: Delay | None = None

    def __post_init__(self) -> None:
        if self.run_at is not None and self.delay_s is not None:
            raise ValueError("give run_at or delay_s, not both")


class _Event(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    v: int = SCHEMA_VERSION


class JobSubmitted(_Event, tag="job.submitted", frozen=True):
    """Published by upstream services on ``jobs.independent`` or ``jobs.dependent``."""

    job: JobSpec
    submitted_at: Epoch


class WorkflowSubmitted(_Event, tag="workflow.submitted", frozen=True):
    """A whole DAG on ``jobs.dependent`` (key: the workflow id): accepted or rejected as one.
    Jobs without a group get the workflow id as their group."""

    id: JobId
    jobs: Annotated[list[JobSpec], Meta(min_length=1, max_length=MAX_WORKFLOW_JOBS)]
    submitted_at: Epoch


class JobRejected(_Event, tag="job.rejected", frozen=True):
    """A submission that was accepted for the record but can never run (a cycle, a forbidden
    cross-tenant dependency); the original bytes are in the dead-letter topic as well."""

    job_id: JobId
    at: Epoch
    reason: Annotated[str, Meta(max_length=4000)]


class JobReady(_Event, tag="job.ready", frozen=True):
    """Intake or the dependency stage says: this job may be admitted now (key: tenant)."""

    job_id: JobId
    tenant: Tenant
    kind: Kind
    submitted_at: Epoch


class Dispatch(_Event, tag="job.dispatch", frozen=True):
    """Admission's command to the worker group: run this attempt of this job (key: job id)."""

    job_id: JobId
    attempt: Annotated[int, Meta(ge=1)]
    tenant: Tenant
    kind: Kind
    args: dict[str, Any]
    timeout_s: Timeout | None
    submitted_at: Epoch
    dispatched_at: Epoch
    group: JobId | None = None
    # admission's due time (priority, size, waiting: docs/admission.md): a worker starts
    # its buffered dispatches earliest-due first across partitions
    due: float | None = None
    # the attempt holds a shared resource (a semaphore beyond its slot): the worker runs it
    # only once its dispatch's offset is committed, so a rebalance cannot hand the same
    # attempt to a second worker after it ran (that run would hold nothing)
    shared: bool = False
    # not before this instant (epoch seconds): the worker holds the dispatch until then (a
    # rate limit held at the start, ``agents.core.startlimit``; a job due at a set time)
    not_before: Epoch | None = None


class JobStarted(_Event, tag="job.started", frozen=True):
    job_id: JobId
    attempt: int
    worker: str
    at: Epoch
    log_path: str | None = None  # where the attempt's output goes (absolute, on the worker)


class JobSucceeded(_Event, tag="job.succeeded", frozen=True):
    job_id: JobId
    attempt: int
    worker: str
    at: Epoch
    exit_code: int = 0
    duration_s: float = 0.0
    log_path: str | None = None


class JobFailed(_Event, tag="job.failed", frozen=True):
    job_id: JobId
    attempt: int
    worker: str
    at: Epoch
    error: Annotated[str, Meta(max_length=4000)]
    exit_code: int | None = None
    duration_s: float = 0.0
    log_path: str | None = None
    retryable: bool = True
    # False for failures that are not the job's: a lost worker, a handed-back attempt
    backoff: bool = True
    # False when the attempt was handed back (worker aborted): it is not counted
    counts: bool = True
    # True: what the attempt holds stays until a worker reports its end (or the monitor's
    # sweep gives it back): a dispatch handed back unread may still reach a worker and start
    keeps_holds: bool = False
    # True: the monitor handed back a dispatch no live worker consumed; it applies only while
    # the attempt is dispatched (a start recorded first keeps the attempt running)
    unstarted: bool = False
    # True: the monitor judged ``worker`` lost; the failure applies only while the attempt's
    # latest recorded start names ``worker`` (started again elsewhere, it runs on there)
    lost_worker: bool = False


class JobCancelled(_Event, tag="job.cancelled", frozen=True):
    """Announces a cancel the control agent applied in PostgreSQL: the job's state changed
    there, in order with the retries on ``jobs.control``; this event changes nothing."""

    job_id: JobId
    at: Epoch
    reason: Annotated[str, Meta(max_length=4000)] = ""
    # the attempt that was in flight (dispatched or running) when it was cancelled, if any
    attempt: Annotated[int, Meta(ge=1)] | None = None


class WorkerHeartbeat(_Event, tag="worker.heartbeat", frozen=True):
    worker: str
    host: str
    slots_total: int
    slots_free: int
    running: list[str]
    at: Epoch
    state: Literal["running", "draining", "stopped"] = "running"
    labels: list[str] = msgspec.field(default_factory=list)
    load: float = 0.0  # 1-minute load average of the host
    pid: int = 0
    since: Epoch = 0.0  # when this worker process started: jobs it ran before are orphans
    progress: dict[str, float] = msgspec.field(default_factory=dict)  # job id -> 0..1
    buffered: list[str] = msgspec.field(default_factory=list)  # dispatches waiting for a slot
    # the dispatch partitions this worker consumes, as ``topic[partition]``: the owner of a
    # dispatch still in Kafka
    assigned: list[str] = msgspec.field(default_factory=list)


class Control(_Event, tag="control", frozen=True):
    """An operator's command on ``jobs.control``: pause or resume a tenant, a kind or a job
    (a running job is stopped with SIGSTOP and continued with SIGCONT by its worker); cancel
    or retry a job; change a queued job's priority; set (or, with ``limit`` None, remove) a
    rate limit at run time. Applied durably in PostgreSQL, then announced to every admission
    process; workers read the topic too, for the running jobs they hold."""

    action: Literal["pause", "resume", "priority", "limit", "cancel", "retry"]
    scope: Literal["tenant", "kind", "job", "tenant_kind", "global"]
    name: Annotated[str, Meta(max_length=300)] = ""
    priority: Priority | None = None
    limit: Annotated[int, Meta(ge=1, le=10**9)] | None = None
    window_s: Annotated[float, Meta(gt=0, le=30 * 86400)] | None = None
    reason: Annotated[str, Meta(max_length=1000)] = ""
    by: Annotated[str, Meta(max_length=200)] = ""
    at: Epoch = 0.0
    # cancel, pause, resume of one attempt: what workers act on. The control agent turns a
    # cancel without it into one with the attempt then in flight (workers ignore cancels
    # without it: a replayed cancel must never stop a later attempt)
    attempt: Annotated[int, Meta(ge=1)] | None = None


def control_problem(c: Control) -> str | None:
    """Why a control command is invalid (checked by the command line before sending, and
    by the scheduler, which dead-letters it), or None."""
    if c.action in ("pause", "resume"):
        if c.scope not in ("tenant", "kind", "job"):
            return f"{c.action} applies to a tenant, a kind or a job, not {c.scope!r}"
        if not c.name:
            return f"{c.action} needs the name of the {c.scope}"
    elif c.action in ("cancel", "retry"):
        if c.scope != "job" or not c.name:
            return f"{c.action} needs scope 'job' and the job id"
    elif c.action == "priority":
        if c.scope != "job" or not c.name or c.priority is None:
            return "priority needs scope 'job', the job id and a priority (-20..20)"
    elif c.action == "limit":
        if c.scope not in ("tenant", "kind", "tenant_kind", "global"):
            return f"a rate limit applies to tenant, kind, tenant_kind or global, not {c.scope!r}"
        if (c.limit is None) != (c.window_s is None):
            return "a rate limit needs both limit and window_s (or neither, to remove it)"
    return None


class AdmissionDecision(_Event, tag="admission.decision", frozen=True):
    """Published on ``scheduler.decisions`` for every admission, with its inputs."""

    job_id: JobId
    attempt: int
    tenant: Tenant
    kind: Kind
    at: Epoch
    priority: int
    size: int
    due: float
    waited_s: float
    holds: dict[str, int]
    rate_keys: list[str]
    free_slots: int


JobEvent = JobStarted | JobSucceeded | JobFailed | JobCancelled
Submission = JobSubmitted | WorkflowSubmitted
AnyEvent = (
    JobSubmitted
    | WorkflowSubmitted
    | JobRejected
    | JobReady
    | Dispatch
    | JobStarted
    | JobSucceeded
    | JobFailed
    | JobCancelled
    | WorkerHeartbeat
    | Control
    | AdmissionDecision
)

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def encode(event: AnyEvent) -> bytes:
    """Encode an event as compact JSON."""
    return _encoder.encode(event)


def _decoder(kind: Any) -> msgspec.json.Decoder[Any]:
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.json.Decoder(kind)
    return dec


def _check_args(value: Any, depth: int = 0) -> None:
    if depth > MAX_ARGS_DEPTH:
        raise InvalidEvent(f"args nested deeper than {MAX_ARGS_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidEvent("args contain a NUL character")
    elif isinstance(value, dict):
        for k, v in value.items():
            if "\x00" in k:
                raise InvalidEvent("args contain a NUL character in a key")
            _check_args(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_args(v, depth + 1)


def _check_job(job: JobSpec) -> None:
    _check_args(job.args)
    if job.id in job.depends_on:
        raise InvalidEvent(f"job {job.id} depends on itself")


def validate_workflow(workflow_id: str, jobs: list[JobSpec]) -> None:
    """A workflow is valid as a whole or not at all: unique ids, each job valid, and no cycle
    among its jobs (dependencies outside the workflow are allowed: they may exist already)."""
    ids: dict[str, JobSpec] = {}
    for job in jobs:
        if job.id in ids:
            raise InvalidEvent(f"workflow {workflow_id}: job id {job.id} appears twice")
        _check_job(job)
        ids[job.id] = job
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    for start in ids:
        if state.get(start):
            continue
        path: list[tuple[str, list[str]]] = [
            (start, [d for d in ids[start].depends_on if d in ids])
        ]
        state[start] = 1
        while path:
            node, todo = path[-1]
            if not todo:
                state[node] = 2
                path.pop()
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                cycle = [n for n, _ in path[[n for n, _ in path].index(nxt) :]] + [nxt]
                raise InvalidEvent(
                    f"workflow {workflow_id}: dependency cycle " + " -> ".join(cycle)
                )
            if not state.get(nxt):
                state[nxt] = 1
                path.append((nxt, [d for d in ids[nxt].depends_on if d in ids]))


def decode(
    raw: bytes | None,
    kind: Any = AnyEvent,
    *,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Any:
    """Decode ``raw`` as one of ``kind`` (a type or a union of event types).

    Raises :class:`InvalidEvent` with a human-readable reason for anything that is not a valid
    event of a supported version; never raises anything else for bad input.
    """
    if raw is None:
        raise InvalidEvent("empty message (no value)")
    if len(raw) > max_bytes:
        raise InvalidEvent(f"payload of {len(raw)} bytes is over the limit of {max_bytes} bytes")
    try:
        event = _decoder(kind).decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"invalid event: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent(f"malformed JSON: {exc}") from None
    except (RecursionError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidEvent(f"undecodable payload: {exc}") from None
    if event.v != SCHEMA_VERSION:
        raise InvalidEvent(
            f"unsupported schema version {event.v} (this build reads {SCHEMA_VERSION})"
        )
    if isinstance(event, JobSubmitted):
        _check_job(event.job)
    elif isinstance(event, WorkflowSubmitted):
        validate_workflow(event.id, event.jobs)
    elif isinstance(event, Dispatch):
        _check_args(event.args)
    return event


class _Tag(Struct, frozen=True):
    type: str = ""


_tag_decoder = msgspec.json.Decoder(_Tag)


def event_type(raw: bytes | None) -> str | None:
    """The ``type`` tag of an encoded event without decoding the rest (None: not an event
    this can read; :func:`decode` says why)."""
    if not raw:
        return None
    try:
        return _tag_decoder.decode(raw).type or None
    except (msgspec.DecodeError, ValueError, UnicodeDecodeError, RecursionError):
        return None


def submission_schema() -> dict[str, Any]:
    """The JSON Schema of a ``job.submitted`` event, for publishers in other languages."""
    schema: dict[str, Any] = msgspec.json.schema(JobSubmitted)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://jobstream.dev/schema/job-submitted.v1.json"
    schema["title"] = "jobstream job.submitted event, version 1"
    return schema
