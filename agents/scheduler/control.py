"""Operator controls from ``jobs.control``: pause/resume, priority, run-time rate limits,
cancel and retry of jobs (applied in order and exactly once: ``agents.store.commands``).

Each command is applied durably in PostgreSQL (``pauses``, ``rate_limits``, ``jobs.priority``)
and announced with ``NOTIFY`` in the same transaction, so every admission process (whichever
tenants it owns) reloads it; a process that starts later reads the tables. A command that makes
no sense (a priority for a tenant, a pause without a name, a limit without a window) is
dead-lettered with the reason, like any bad input.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

from agents.context import Context, RawMessage, retrying
from agents.deadletter import Rejected, dead_letter
from agents.scheduler.intake import forward_ready
from agents.store.commands import JobCommand
from streams.errors import InvalidEvent
from streams.events import Control, JobCancelled, control_problem, decode, encode
from streams.kafka import Record


async def handle_control(ctx: Context, messages: Sequence[RawMessage]) -> int:
    bad: list[Rejected] = []
    good: list[Control] = []
    job_cmds: list[tuple[RawMessage, Control]] = []
    for msg in messages:
        try:
            cmd = decode(msg.value, Control, max_bytes=ctx.settings.max_payload_bytes)
        except InvalidEvent as exc:
            bad.append((msg, str(exc)))
            continue
        reason = control_problem(cmd)
        if reason is not None:
            bad.append((msg, f"invalid control command: {reason}"))
        elif cmd.action in ("cancel", "retry"):
            job_cmds.append((msg, cmd))
        else:
            good.append(cmd)
    if job_cmds:
        bad.extend(await _job_commands(ctx, job_cmds))
    await dead_letter(ctx, bad)
    if not good:
        return len(job_cmds)
    store = await ctx.store()

    async def tx() -> None:
        await store.apply_controls(good)

    await retrying("apply controls", tx)
    return len(good)


async def _job_commands(ctx: Context, cmds: Sequence[tuple[RawMessage, Control]]) -> list[Rejected]:
    """Cancels and retries, applied in PostgreSQL in their order on the topic and exactly
    once (``agents.store.commands``); dependents follow their trigger rule or wait again. Then each
    cancel is announced (``job.cancelled`` on ``jobs.events``, keyed by the job's group) and,
    when an attempt was in flight, aimed at that attempt on ``jobs.control`` (workers stop it;
    a cancel without an attempt never reaches a process: replayed later, it could stop a
    retried attempt). Unknown jobs are rejected."""
    store = await ctx.store()
    s = ctx.settings
    routes = await retrying("look up jobs", lambda: store.job_route([c.name for _, c in cmds]))
    bad: list[Rejected] = []
    todo: list[JobCommand] = []
    for msg, c in cmds:
        if c.name not in routes:
            bad.append((msg, f"{c.action}: no job {c.name!r}"))
            continue
        action: Literal["cancel", "retry"] = "cancel" if c.action == "cancel" else "retry"
        todo.append(
            JobCommand(
                msg.topic,
                msg.partition,
                msg.offset,
                action,
                c.name,
                attempt=c.attempt,
                reason=c.reason,
                by=c.by,
                at=c.at,
            )
        )
    if not todo:
        return bad
    applied = await retrying(
        "cancel and retry jobs",
        lambda: store.apply_job_commands(
            todo,
            now=time.time(),
            grace_s=s.dependency_grace_s,
            allow_cross_tenant=s.allow_cross_tenant_deps,
        ),
    )
    reasons = {c.job: c.reason for c in todo if c.action == "cancel"}
    records: list[Record] = []
    for x in applied.cancelled:
        event = JobCancelled(
            job_id=x.job, at=time.time(), reason=reasons.get(x.job, ""), attempt=x.attempt
        )
        records.append(Record(ctx.topic("jobs.events"), encode(event), (x.group or x.job).encode()))
        if x.attempt is not None:
            stop = Control(
                action="cancel",
                scope="job",
                name=x.job,
                attempt=x.attempt,
                reason=reasons.get(x.job, ""),
                by="scheduler",
                at=time.time(),
            )
            records.append(Record(ctx.topic("jobs.control"), encode(stop), x.job.encode()))
    if records:
        await retrying("announce cancels", lambda: ctx.producer.aproduce(records))
    await forward_ready(ctx, applied.ready)
    return bad
