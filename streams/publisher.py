"""Publishing API for upstream services: submit jobs without importing faust.

    from streams import JobPublisher, JobSpec
    with JobPublisher("kafka:9092") as pub:
        pub.submit(JobSpec(id="upload-42-nomos", tenant="acme", kind="nomos"))

Invariants:
- ``submit`` returns only after the broker confirmed the event (idempotent producer, acks=all),
  so a returned call means the job will be seen by intake; a retried call with the same job id
  is harmless (the job id is the idempotency key).
- Independent jobs are keyed by job id on ``jobs.independent``; jobs with dependencies or a
  group are keyed by group on ``jobs.dependent``, so a group's submissions stay in order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from streams.events import JobSpec, JobSubmitted, encode
from streams.kafka import ConfirmedProducer, Record, producer_config
from streams.topics import TopicRegistry, load_topics


def route(job: JobSpec) -> tuple[str, bytes]:
    """(logical topic, key) for a submission."""
    if job.depends_on or job.group:
        return "jobs.dependent", (job.group or job.id).encode()
    return "jobs.independent", job.id.encode()


class JobPublisher:
    def __init__(
        self,
        bootstrap: str,
        *,
        registry: TopicRegistry | None = None,
        extra: Mapping[str, Any] | None = None,
        linger_ms: int = 0,
    ) -> None:
        self.registry = registry or load_topics()
        self._producer = ConfirmedProducer(producer_config(bootstrap, extra, linger_ms=linger_ms))

    def record(self, job: JobSpec, submitted_at: float | None = None) -> Record:
        logical, key = route(job)
        event = JobSubmitted(
            job=job, submitted_at=time.time() if submitted_at is None else submitted_at
        )
        return Record(self.registry.name(logical), encode(event), key)

    def submit(self, job: JobSpec, timeout_s: float = 30.0) -> None:
        self._producer.produce_confirmed([self.record(job)], timeout_s)

    def submit_many(self, jobs: Iterable[JobSpec], timeout_s: float = 60.0) -> int:
        records = [self.record(j) for j in jobs]
        self._producer.produce_confirmed(records, timeout_s)
        return len(records)

    def send_raw(self, logical_topic: str, value: bytes, key: bytes | None = None) -> None:
        """Publish bytes as they are (tests and replay of dead letters use this)."""
        self._producer.produce_confirmed([Record(self.registry.name(logical_topic), value, key)])

    def close(self) -> None:
        self._producer.close()

    def __enter__(self) -> JobPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
