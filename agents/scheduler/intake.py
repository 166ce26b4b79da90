"""Intake: decode and validate submissions, and forward ready jobs to their admission owner.

Submissions of both intake topics are validated here and persisted by the dependency stage
(``agents.scheduler.dependencies``), in the transaction of their hot cycle
(``agents.scheduler.cycle``).

Invariants:
- Every consumed message ends as exactly one of: job rows in PostgreSQL, or a dead-letter
  record (topic ``jobs.deadletter`` and table ``dead_letters``) with the original bytes, origin
  and reason. Offsets are acknowledged only after both are durable.
- A workflow is accepted or rejected whole: one message, one validation, one transaction.
- Persisting is idempotent on job id; after a replay, jobs of the batch that are still ready
  are forwarded again (admission's guard makes the duplicate harmless).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from agents.context import Context, RawMessage, retrying
from agents.core.command import missing_args
from agents.deadletter import Rejected
from agents.store.rows import Accepted, ReadyJob
from streams.errors import InvalidEvent
from streams.events import (
    JobReady,
    JobSpec,
    JobSubmitted,
    Submission,
    WorkflowSubmitted,
    decode,
    encode,
)
from streams.kafka import Record, partition_for


def ready_records(ctx: Context, jobs: Sequence[ReadyJob]) -> list[Record]:
    topic = ctx.topic("jobs.ready")
    partitions = ctx.registry["jobs.ready"].partitions
    return [
        Record(
            topic,
            encode(
                JobReady(job_id=j.id, tenant=j.tenant, kind=j.kind, submitted_at=j.submitted_at)
            ),
            j.tenant.encode(),
            partition=partition_for(j.tenant.encode(), partitions),
        )
        for j in jobs
    ]


async def forward_ready(ctx: Context, jobs: Sequence[ReadyJob]) -> int:
    """Hand each ready job to its tenant's admission owner: this process's own when it owns
    the tenant now (no hop: the job is already ``ready`` in PostgreSQL, where any owner
    finds it again), else ``job.ready`` on ``jobs.ready`` (keyed by tenant), confirmed by
    the broker."""
    rest = await ctx.admission.take_local(jobs) if ctx.admission is not None and jobs else jobs
    if rest:
        records = ready_records(ctx, rest)
        await retrying("forward ready", lambda: ctx.producer.aproduce(records))
        ctx.metrics.count("ready_handoffs", {"path": "topic"}, n=len(rest))
    if len(rest) < len(jobs):
        ctx.metrics.count("ready_handoffs", {"path": "local"}, n=len(jobs) - len(rest))
    return len(jobs)


def _check_kind(ctx: Context, job: JobSpec) -> None:
    kind = ctx.settings.kinds.get(job.kind)
    if kind is None:
        raise InvalidEvent(
            f"unknown kind {job.kind!r} (job {job.id}); known kinds: "
            f"{', '.join(sorted(ctx.settings.kinds))}"
        )
    missing = missing_args(kind.command, job.args)
    if missing:  # it would fail on the worker: said now, with the names
        raise InvalidEvent(
            f"job {job.id}: kind {job.kind!r} needs the argument(s) {', '.join(missing)}"
        )


def _check_member_sizes(ctx: Context, flow: WorkflowSubmitted) -> None:
    """Each job of a workflow within the per-job limit, as if submitted alone: its dispatch
    must be runnable by a worker (who rejects dispatches over the limit)."""
    limit = ctx.settings.max_payload_bytes
    for job in flow.jobs:
        size = len(encode(JobSubmitted(job=job, submitted_at=flow.submitted_at)))
        if size > limit:
            raise InvalidEvent(
                f"job {job.id} of workflow {flow.id} is {size} bytes, over the limit of "
                f"{limit} bytes for one job"
            )


def accept_submissions(
    ctx: Context, messages: Sequence[RawMessage], *, dependent: bool
) -> tuple[list[Accepted], list[Rejected], dict[str, RawMessage]]:
    """Validate submissions; return (jobs to persist, rejected messages, job id → message)."""
    accepted: list[Accepted] = []
    rejected: list[Rejected] = []
    origin: dict[str, RawMessage] = {}
    for msg in messages:
        try:
            limit = ctx.settings.max_workflow_bytes if dependent else ctx.settings.max_payload_bytes
            event = decode(msg.value, Submission, max_bytes=limit)
            if isinstance(event, JobSubmitted):
                jobs, workflow = [event.job], None
                if len(msg.value or b"") > ctx.settings.max_payload_bytes:
                    raise InvalidEvent(
                        f"payload of {len(msg.value or b'')} bytes is over the limit of "
                        f"{ctx.settings.max_payload_bytes} bytes"
                    )
            else:
                if not dependent:
                    raise InvalidEvent("a workflow must be published on jobs.dependent")
                jobs, workflow = event.jobs, event.id
                _check_member_sizes(ctx, event)
            for job in jobs:
                _check_kind(ctx, job)
                if not dependent and (job.depends_on or job.order_key):
                    raise InvalidEvent(
                        "a job with depends_on or order_key must be published on jobs.dependent"
                    )
        except InvalidEvent as exc:
            rejected.append((msg, str(exc)))
            continue
        for job in jobs:
            if workflow is not None and job.group is None:
                job = msgspec.structs.replace(job, group=workflow)
            kind = ctx.settings.kinds[job.kind]
            accepted.append(
                Accepted(
                    job,
                    event.submitted_at,
                    job.max_attempts or kind.max_attempts,
                    (msg.topic, msg.partition, msg.offset),
                    workflow,
                )
            )
            origin[job.id] = msg
    m = ctx.metrics
    for a in accepted:
        m.count("jobs_submitted", {"tenant": a.job.tenant, "kind": a.job.kind})
    return accepted, rejected, origin
