"""Dead letters: rejected input, kept byte for byte with its origin and the reason.

Invariant: a rejected message is produced to ``jobs.deadletter`` (value = original bytes,
headers = origin topic/partition/offset, reason, time) and recorded in the ``dead_letters``
table before the input offset is acknowledged; recording is idempotent on the origin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agents.context import Context, RawMessage, retrying
from agents.store.rows import DeadLetterRow
from streams.errors import InvalidEvent
from streams.events import decode
from streams.kafka import Record, dead_letter_record

Rejected = tuple[RawMessage, str]


def dead_letters(
    ctx: Context, rejected: Sequence[Rejected]
) -> tuple[list[Record], list[DeadLetterRow]]:
    topic = ctx.topic("jobs.deadletter")
    records = [
        dead_letter_record(
            topic,
            value=m.value,
            key=m.key,
            origin_topic=m.topic,
            partition=m.partition,
            offset=m.offset,
            reason=reason,
        )
        for m, reason in rejected
    ]
    rows = [
        DeadLetterRow(m.topic, m.partition, m.offset, m.key, m.value, reason)
        for m, reason in rejected
    ]
    return records, rows


def decode_all(
    ctx: Context, messages: Sequence[RawMessage], kind: Any
) -> tuple[list[Any], list[Rejected]]:
    """Decode each message as ``kind``; what fails is returned with its reason."""
    decoded: list[Any] = []
    rejected: list[Rejected] = []
    for msg in messages:
        try:
            decoded.append(decode(msg.value, kind, max_bytes=ctx.settings.max_payload_bytes))
        except InvalidEvent as exc:
            rejected.append((msg, str(exc)))
    return decoded, rejected


async def dead_letter(ctx: Context, rejected: Sequence[Rejected]) -> None:
    """Produce, then (where this process has a database: not workers) record in PostgreSQL."""
    if not rejected:
        return
    records, rows = dead_letters(ctx, rejected)
    for msg, _ in rejected:
        ctx.metrics.count("dead_letters", {"topic": msg.topic})
    await retrying("dead-letter produce", lambda: ctx.producer.aproduce(records))
    if ctx.settings.database_url:
        store = await ctx.store()
        await retrying("dead-letter persist", lambda: store.record_dead_letters(rows))
