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
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import msgspec

from streams.errors import InvalidEvent
from streams.events import (
    DEFAULT_MAX_WORKFLOW_BYTES,
    JobSpec,
    JobSubmitted,
    WorkflowSubmitted,
    encode,
    validate_workflow,
)
from streams.kafka import ConfirmedProducer, Record, producer_config
from streams.topics import TopicRegistry, load_topics


def route(job: JobSpec) -> tuple[str, bytes]:
    """(logical topic, key) for a submission: jobs with dependencies, a group or an order key
    go to ``jobs.dependent`` keyed by group (else order key), so that one owner sees them and
    their completions in order; the rest to ``jobs.independent`` keyed by job id."""
    if job.depends_on or job.group or job.order_key:
        return "jobs.dependent", (job.group or job.order_key or job.id).encode()
    return "jobs.independent", job.id.encode()


class JobPublisher:
    def __init__(
        self,
        bootstrap: str,
        *,
        registry: TopicRegistry | None = None,
        extra: Mapping[str, Any] | None = None,
        linger_ms: int = 0,
        max_workflow_bytes: int = DEFAULT_MAX_WORKFLOW_BYTES,
        one_shot: bool = False,
    ) -> None:
        """``one_shot``: a publisher for a few records (a command line): without the
        idempotent producer, whose producer-id handshake holds the first send ~0.5 s. A
        retried send may then arrive twice; intake accepts a job id once and control
        commands repeat harmlessly (a second cancel, retry or pause changes nothing)."""
        self.registry = registry or load_topics()
        self.max_workflow_bytes = max_workflow_bytes
        cfg = producer_config(bootstrap, extra, linger_ms=linger_ms)
        if one_shot:
            if "enable.idempotence" not in (extra or {}):
                cfg["enable.idempotence"] = False
            # a new client's first metadata waits out half the reconnect backoff (default
            # 100 ms: ~50 ms of a command's wall time); a one-shot client reconnects sooner
            cfg.setdefault("reconnect.backoff.ms", 10)
        self._producer = ConfirmedProducer(cfg, poll_s=0.005 if one_shot else 0.05)
        self.bootstrap = bootstrap

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

    def workflow_record(
        self, workflow_id: str, jobs: Sequence[JobSpec], submitted_at: float | None = None
    ) -> Record:
        jobs = [j if j.group else msgspec.structs.replace(j, group=workflow_id) for j in jobs]
        event = WorkflowSubmitted(
            id=workflow_id,
            jobs=list(jobs),
            submitted_at=time.time() if submitted_at is None else submitted_at,
        )
        validate_workflow(workflow_id, event.jobs)  # fail here rather than in the dead letters
        value = encode(event)
        if len(value) > self.max_workflow_bytes:
            raise InvalidEvent(
                f"workflow {workflow_id} is {len(value)} bytes, over the "
                f"limit of {self.max_workflow_bytes}; split it"
            )
        return Record(self.registry.name("jobs.dependent"), value, workflow_id.encode())

    def submit_workflow(
        self, workflow_id: str, jobs: Sequence[JobSpec], timeout_s: float = 30.0
    ) -> None:
        """Publish a whole DAG as one event: intake accepts or rejects all of it together."""
        self._producer.produce_confirmed([self.workflow_record(workflow_id, jobs)], timeout_s)

    def send_raw(self, logical_topic: str, value: bytes, key: bytes | None = None) -> None:
        """Publish bytes as they are (tests and replay of dead letters use this)."""
        self._producer.produce_confirmed([Record(self.registry.name(logical_topic), value, key)])

    def ready(self, timeout_s: float) -> JobPublisher:
        """This publisher once the cluster answers (``KafkaUnavailable`` within
        ``timeout_s`` otherwise): a command says at once that Kafka is down."""
        self._producer.ready(self.bootstrap, timeout_s, self.registry.name("jobs.independent"))
        return self

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
