"""What every agent shares in one process: settings, topics, the store and a producer.

Invariant: resources are opened once per process, lazily, on the event loop that uses them,
and closed on shutdown; handlers receive the context and never build clients themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from agents.errors import StoreUnavailable
from agents.metrics import Metrics, process_tags
from agents.pools import (
    dispatch_partition,
    dispatch_place,
    dispatch_topic,
    ensure_pool_topics,
    pool_of,
)
from agents.settings import Settings
from agents.store import PostgresJobStore
from agents.store.admission import AdmitResult, CyclePlan, CyclePlanner
from agents.store.rows import ReadyJob
from agents.trace import Tracer
from streams.errors import DeliveryFailed, KafkaUnavailable
from streams.kafka import ConfirmedProducer, producer_config
from streams.topics import TopicRegistry, load_topics

log = logging.getLogger("jobstream")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A consumed message as the handlers see it: bytes and where they came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class LocalAdmission(CyclePlanner, Protocol):
    """What the stages of a process tell the admission owner running beside them; the hot
    cycle lets it decide inside its transaction (``CyclePlanner``)."""

    async def carry_out(self, plan: CyclePlan, res: AdmitResult | None) -> None:
        """After the cycle's COMMIT: send what its transaction dispatched."""
        ...

    async def take_local(self, jobs: Sequence[ReadyJob]) -> list[ReadyJob]:
        """Queue the ready jobs of the tenants it owns (no ``jobs.ready`` hop); the others
        are returned, for the topic."""
        ...

    def observe_work(self, durations: Sequence[tuple[str, float]]) -> None:
        """Successes' run times (kind, seconds): the in-flight depth per kind."""
        ...

    def capacity_freed(self) -> None:
        """Attempts ended here and gave their holds back, and no decision was taken in that
        transaction: decide again now (the NOTIFY that tells the other processes reaches
        this one a round trip later)."""
        ...

    def starts_reported(self, starts: Sequence[tuple[str, float]]) -> None:
        """Starts of admitted jobs (job id, when): rate limits held at the start wait on
        them."""
        ...


@dataclass
class Context:
    settings: Settings
    registry: TopicRegistry
    _store: PostgresJobStore | None = None
    _producer: ConfirmedProducer | None = None
    _dispatch_producer: ConfirmedProducer | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _pools_known: set[str] = field(default_factory=set)
    process: str = "scheduler"  # the ``process`` tag of this process's metrics
    _metrics: Metrics | None = None
    _tracer: Tracer | None = None
    # the admission owner in this process, when there is one (``LocalAdmission``)
    admission: LocalAdmission | None = None
    status_url: str | None = None  # the status page's address once it serves

    @classmethod
    def from_settings(cls, settings: Settings) -> Context:
        registry = load_topics(settings.topics_file, prefix=settings.topic_prefix)
        return cls(settings, registry)

    async def store(self) -> PostgresJobStore:
        if self._store is None:
            async with self._lock:
                if self._store is None:
                    # every connection opened (and warmed) at start: one opened on demand
                    # costs a handshake and cold catalog caches on the path of the batch
                    # that needed it
                    size = self.settings.db_pool_size
                    store = PostgresJobStore(
                        self.settings.require_database(), min_size=size, max_size=size, warm=True
                    )
                    await store.open()
                    self._store = store
        return self._store

    @property
    def producer(self) -> ConfirmedProducer:
        if self._producer is None:
            self._producer = ConfirmedProducer(
                producer_config(
                    self.settings.require_kafka(), self.settings.kafka_config, linger_ms=0
                )
            )
        return self._producer

    @property
    def dispatch_producer(self) -> ConfirmedProducer:
        """The producer of dispatch commands: ``producer``, except when workers take them
        through a share group. A share group hands out whole record batches (a batch of 30
        dispatches went to one worker with 2 free slots while two others stayed idle; giving
        the surplus back raised their delivery counts towards the broker's limit, past which
        a record is archived), so there every dispatch is a batch of its own."""
        if self.settings.worker_dispatch != "share":
            return self.producer
        if self._dispatch_producer is None:
            cfg = producer_config(
                self.settings.require_kafka(), self.settings.kafka_config, linger_ms=0
            )
            cfg["batch.num.messages"] = 1
            self._dispatch_producer = ConfirmedProducer(cfg)
        return self._dispatch_producer

    @property
    def tracer(self) -> Tracer:
        """Per-job stage timestamps (``trace_file``); a no-op unless set."""
        if self._tracer is None:
            self._tracer = Tracer(self.settings.trace_file)
        return self._tracer

    @property
    def metrics(self) -> Metrics:
        """This process's metrics (started on first use; a no-op without ``metrics_url``)."""
        if self._metrics is None:
            s = self.settings
            self._metrics = Metrics(
                s.metrics_url,
                interval_s=s.metrics_interval_s,
                tags=process_tags(self.process, {"app": s.app_id}),
            ).start()
        return self._metrics

    def topic(self, logical: str) -> str:
        return self.registry.name(logical)

    def dispatch_topic(self, kind: str) -> str:
        """``jobs.dispatch``, or ``jobs.dispatch.<pool>`` for kinds pinned to labelled workers."""
        return dispatch_topic(self.settings, self.registry, kind)

    def dispatch_partition(self, job_id: str) -> int:
        return dispatch_partition(self.registry, job_id)

    def dispatch_place(self, kind: str, job_id: str) -> str:
        """``topic[partition]`` of a job's dispatch, as workers list their assignment."""
        return dispatch_place(self.settings, self.registry, kind, job_id)

    async def ensure_pools(self, kinds: set[str]) -> None:
        pools = {p for k in kinds if (p := pool_of(self.settings, k)) is not None}
        if pools - self._pools_known:
            await retrying(
                "create pool topics",
                lambda: ensure_pool_topics(self.settings, self.registry, pools, self._pools_known),
            )

    async def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._store is not None:
            await self._store.close()
            self._store = None
        if self._producer is not None:
            self._producer.close()
            self._producer = None
        if self._dispatch_producer is not None:
            self._dispatch_producer.close()
            self._dispatch_producer = None


TRANSIENT = (StoreUnavailable, DeliveryFailed, KafkaUnavailable)


async def retrying(
    what: str,
    fn: Callable[[], Awaitable[T]],
    *,
    first_delay_s: float = 0.2,
    max_delay_s: float = 15.0,
) -> T:
    """Run ``fn`` until it succeeds, backing off on transient failures (a database or broker
    that is down). The batch being handled is held, not dropped and not acked, meanwhile."""
    delay = first_delay_s
    failing_since: float | None = None
    while True:
        try:
            result = await fn()
        except TRANSIENT as exc:
            if failing_since is None:
                failing_since = time.monotonic()
                log.warning("%s: %s; retrying with backoff", what, exc)
            await asyncio.sleep(delay)
            delay = min(max_delay_s, delay * 2)
            continue
        if failing_since is not None:
            log.warning("%s: recovered after %.1f s", what, time.monotonic() - failing_since)
        return result
