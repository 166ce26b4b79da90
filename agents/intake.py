"""Intake: decode and validate submissions, persist them, forward the ready ones.

Invariants:
- Every consumed message ends as exactly one of: a job row in PostgreSQL, or a dead-letter
  record (topic ``jobs.deadletter`` and table ``dead_letters``) with the original bytes, origin
  and reason. Offsets are acknowledged only after both are durable.
- Persisting is idempotent on job id; after a replay, jobs of the batch that are still ready
  are forwarded again (admission's guard makes the duplicate harmless).
"""

from __future__ import annotations

from collections.abc import Sequence

from agents.context import Context, RawMessage, retrying
from agents.deadletter import dead_letter
from agents.store import Accepted, ReadyJob
from streams.errors import InvalidEvent
from streams.events import JobReady, JobSubmitted, decode, encode
from streams.kafka import Record


def ready_records(ctx: Context, jobs: Sequence[ReadyJob]) -> list[Record]:
    topic = ctx.topic("jobs.ready")
    return [
        Record(
            topic,
            encode(
                JobReady(job_id=j.id, tenant=j.tenant, kind=j.kind, submitted_at=j.submitted_at)
            ),
            j.tenant.encode(),
        )
        for j in jobs
    ]


async def forward_ready(ctx: Context, jobs: Sequence[ReadyJob]) -> int:
    """Publish ``job.ready`` for each job (keyed by tenant) and wait for the broker."""
    records = ready_records(ctx, jobs)
    await retrying("forward ready", lambda: ctx.producer.aproduce(records))
    return len(records)


def validate(ctx: Context, msg: RawMessage) -> JobSubmitted:
    event = decode(msg.value, JobSubmitted, max_bytes=ctx.settings.max_payload_bytes)
    if not isinstance(event, JobSubmitted):  # pragma: no cover - decode returns the type
        raise InvalidEvent("not a job.submitted event")
    job = event.job
    if job.kind not in ctx.settings.kinds:
        raise InvalidEvent(
            f"unknown kind {job.kind!r}; known kinds: {', '.join(sorted(ctx.settings.kinds))}"
        )
    if msg.topic == ctx.topic("jobs.independent") and job.depends_on:
        raise InvalidEvent("a job with depends_on must be published on jobs.dependent")
    return event


async def handle_submissions(ctx: Context, messages: Sequence[RawMessage]) -> int:
    """Handle one batch; return the number of jobs forwarded as ready."""
    accepted: list[Accepted] = []
    rejected: list[tuple[RawMessage, str]] = []
    for msg in messages:
        try:
            event = validate(ctx, msg)
        except InvalidEvent as exc:
            rejected.append((msg, str(exc)))
            continue
        kind = ctx.settings.kinds[event.job.kind]
        accepted.append(
            Accepted(
                event.job,
                event.submitted_at,
                event.job.max_attempts or kind.max_attempts,
                (msg.topic, msg.partition, msg.offset),
            )
        )
    await dead_letter(ctx, rejected)
    store = await ctx.store()
    ready = await retrying("intake persist", lambda: store.accept(accepted))
    return await forward_ready(ctx, ready)
