"""Thin adapters over confluent-kafka: client configuration, topic apply, confirmed produce.

Invariants:
- ``KafkaException`` and delivery errors are translated here into ``streams.errors``; nothing
  above this module sees a driver exception.
- ``produce_confirmed`` returns only after the broker acknowledged every message (acks=all,
  idempotent producer), so a caller may commit its input offsets afterwards.
- Security settings (``security.protocol``, ``sasl.*``, ``ssl.*``) pass through unchanged in
  ``extra``; they are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from streams.errors import DeliveryFailed, KafkaUnavailable
from streams.topics import TopicRegistry

log = logging.getLogger("jobstream.kafka")


class _ClientLog(logging.Logger):
    """librdkafka's own log lines (a broker that refuses connections repeats one every
    ~50 ms): routed to Python logging as ``jobstream.kafka.client`` at DEBUG, silent at the
    default level; what a caller must know reaches it as an error or a timeout."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(logging.DEBUG):
            super().log(logging.DEBUG, f"[{logging.getLevelName(level)}] {msg}", *args, **kwargs)


CLIENT_LOG = _ClientLog("jobstream.kafka.client")
CLIENT_LOG.parent = log

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Record:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: Headers | None = None
    partition: int | None = None  # None: the producer's partitioner picks (by key)


def partition_for(key: bytes, partitions: int) -> int:
    """The partition of ``key``: CRC-32 modulo the partition count (librdkafka's
    ``consistent`` partitioner). Producers of keyed-ownership topics (``jobs.ready``) set it
    explicitly, so the owner of a key can be computed by anyone, whatever the client."""
    return zlib.crc32(key) % partitions


def client_config(bootstrap: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": CLIENT_LOG}
    cfg.update(extra or {})
    return cfg


def producer_config(
    bootstrap: str, extra: Mapping[str, Any] | None = None, *, linger_ms: int = 1
) -> dict[str, Any]:
    cfg = client_config(bootstrap, extra)
    cfg.setdefault("enable.idempotence", True)
    cfg.setdefault("acks", "all")
    cfg.setdefault("linger.ms", linger_ms)
    cfg.setdefault("compression.type", "lz4")
    return cfg


def wait_for_broker(
    bootstrap: str, extra: Mapping[str, Any] | None = None, timeout_s: float = 30.0
) -> None:
    """Block until the cluster answers a metadata request, or raise ``KafkaUnavailable``."""
    admin = AdminClient(client_config(bootstrap, extra))
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            md = admin.list_topics(timeout=min(5.0, max(0.5, deadline - time.monotonic())))
            if md.brokers:
                return
        except KafkaException as exc:
            last = exc
        time.sleep(0.2)
    raise _unanswered(bootstrap, timeout_s, last)


def _unanswered(bootstrap: str, timeout_s: float, why: object) -> KafkaUnavailable:
    """The error of a metadata request nobody answered (the driver's own words for why)."""
    if isinstance(why, KafkaException) and isinstance(why.args[0], KafkaError):
        why = why.args[0].str()
    return KafkaUnavailable(f"Kafka at {bootstrap} did not answer within {timeout_s:.0f} s ({why})")


def delete_topics(
    bootstrap: str, prefix: str, extra: Mapping[str, Any] | None = None, timeout_s: float = 60.0
) -> list[str]:
    """Delete every topic whose name starts with ``prefix`` (a test's or a bench run's own
    topics: a broker that keeps every run's partitions slows down and takes minutes to start
    with thousands). Returns the names deleted; raises ``KafkaException`` when the broker
    refuses or does not answer."""
    if not prefix:
        raise ValueError("refusing to delete topics without a prefix")
    admin = AdminClient(client_config(bootstrap, extra))
    names = sorted(t for t in admin.list_topics(timeout=timeout_s).topics if t.startswith(prefix))
    if names:
        for fut in admin.delete_topics(names, operation_timeout=timeout_s).values():
            fut.result(timeout=timeout_s)
    return names


@dataclass(frozen=True)
class TopicReport:
    created: list[str]
    existing: list[str]
    mismatched: list[str]  # human-readable lines, one per topic whose partitions differ

    @property
    def ok(self) -> bool:
        return not self.mismatched


def apply_topics(
    registry: TopicRegistry,
    bootstrap: str,
    extra: Mapping[str, Any] | None = None,
    *,
    create: bool = True,
    timeout_s: float = 30.0,
) -> TopicReport:
    """Create missing topics (when ``create``) and report partition-count differences."""
    admin = AdminClient(client_config(bootstrap, extra))
    try:
        md = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaUnavailable(f"cannot list topics at {bootstrap}: {exc}") from None
    created: list[str] = []
    existing: list[str] = []
    mismatched: list[str] = []
    missing: list[NewTopic] = []
    for name, spec in registry.physical().items():
        topic = md.topics.get(name)
        if topic is None or topic.error is not None:
            missing.append(
                NewTopic(
                    name,
                    num_partitions=spec.partitions,
                    replication_factor=spec.replication,
                    config=spec.config(registry.min_insync),
                )
            )
            continue
        existing.append(name)
        if len(topic.partitions) != spec.partitions:
            mismatched.append(
                f"{name}: cluster has {len(topic.partitions)} partitions, "
                f"topics.yaml says {spec.partitions}"
            )
    if missing and create:
        futures = admin.create_topics(missing, operation_timeout=timeout_s)
        for name, fut in futures.items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    existing.append(name)
                else:
                    raise KafkaUnavailable(f"cannot create topic {name}: {exc}") from None
    elif missing:
        mismatched.extend(f"{t.topic}: missing" for t in missing)
    return TopicReport(sorted(created), sorted(existing), mismatched)


class _Batch:
    """Counts delivery reports of one batch and keeps each failed record's error by its index
    in the batch; ``on_done`` runs (on the poll thread) after the last report."""

    def __init__(self, size: int, on_done: Callable[[], object]) -> None:
        self.size = size
        self.remaining = size
        self.failed: dict[int, str] = {}
        self._on_done = on_done
        self._lock = threading.Lock()

    def on_delivery(self, index: int, err: KafkaError | None, _msg: Any) -> None:
        self.settle(index, None if err is None else str(err))

    def settle(self, index: int, error: str | None) -> None:
        """Record ``index``'s outcome (``error``: why it failed); the last one runs
        ``on_done``."""
        with self._lock:
            if error is not None:
                self.failed[index] = error
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self._on_done()

    def unconfirmed(self, timeout_s: float) -> DeliveryFailed:
        return DeliveryFailed(
            f"{self.remaining} of {self.size} messages unconfirmed after {timeout_s:.0f} s"
        )

    def check(self) -> None:
        if self.failed:
            first = self.failed[min(self.failed)]
            raise DeliveryFailed(f"{len(self.failed)} of {self.size} messages failed: {first}")


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _resolve_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Then:
    """One ``produce_then`` call: told once, when its batch is settled or past its time."""

    __slots__ = ("done", "timeout_s", "deadline", "batch", "over")

    def __init__(
        self, done: Callable[[dict[int, str] | DeliveryFailed], object], timeout_s: float
    ) -> None:
        self.done, self.timeout_s = done, timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.batch: _Batch | None = None
        self.over = False

    def settle(self) -> None:
        if not self.over:
            self.over = True
            assert self.batch is not None
            self.done(dict(self.batch.failed))

    def expire(self, exc: DeliveryFailed) -> None:
        if not self.over:
            self.over = True
            self.done(exc)


class ConfirmedProducer:
    """A confluent-kafka producer whose sends return once the broker confirmed them.

    A background thread serves delivery callbacks; ``produce_confirmed`` may be called from
    several threads, and ``aproduce`` from an asyncio loop without blocking it.
    """

    def __init__(self, config: Mapping[str, Any], poll_s: float = 0.05) -> None:
        """``poll_s``: the callback thread's wait per turn, and so what ``close`` may wait
        for it (a one-shot command's producer takes a short one)."""
        self._producer = Producer(dict(config))
        self._poll_s = poll_s
        # with linger.ms 0 librdkafka sends at once; otherwise its sender is woken once per
        # loop turn (``_flush_now``), so that a confirmed send does not wait for the linger
        linger = config.get("linger.ms", config.get("queue.buffering.max.ms", 5))
        self._wake = float(linger) > 0
        self._flush_soon = False
        # per loop: what runs there once batches are confirmed (futures to resolve, calls)
        self._ready: dict[asyncio.AbstractEventLoop, list[Callable[[], object]]] = {}
        self._watched: dict[asyncio.AbstractEventLoop, set[_Then]] = {}  # ``produce_then``
        self._ready_lock = threading.Lock()
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-producer-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(self._poll_s)

    def produce_confirmed(self, records: Sequence[Record], timeout_s: float = 30.0) -> None:
        """Produce and block until the broker confirmed every record."""
        if not records:
            return
        done = threading.Event()
        batch = self._send(records, done.set)
        self._producer.flush(0)  # wake the sender: do not wait for linger.ms
        if not done.wait(timeout_s):
            raise batch.unconfirmed(timeout_s)
        batch.check()

    async def aproduce(self, records: Sequence[Record], timeout_s: float = 30.0) -> None:
        """Produce and wait for every confirmation without blocking the event loop; raises
        :class:`DeliveryFailed` when any record failed or was not confirmed in time.

        Cheap per call (hot in the worker and the agents): one future and one timer, the
        sender woken once per loop turn for all calls of that turn, and the loop woken once
        for all batches confirmed by one delivery pass (not once per batch)."""
        batch = await self._confirmed_batch(records, timeout_s)
        if batch is not None:
            batch.check()

    async def _confirmed_batch(self, records: Sequence[Record], timeout_s: float) -> _Batch | None:
        if not records:
            return None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        batch = self._send(records, partial(self._confirmed, loop, fut))
        if self._wake and not self._flush_soon:
            self._flush_soon = True
            loop.call_soon(self._flush_now)
        timer = loop.call_later(timeout_s, _expire, fut)
        try:
            await fut
        except TimeoutError:
            raise batch.unconfirmed(timeout_s) from None
        finally:
            timer.cancel()
        return batch

    def _flush_now(self) -> None:
        self._flush_soon = False
        self._producer.flush(0)  # wake the sender once for this loop turn's sends

    def produce_then(
        self,
        records: Sequence[Record],
        done: Callable[[dict[int, str] | DeliveryFailed], object],
        timeout_s: float = 30.0,
    ) -> None:
        """Produce without a task, a future or a timer per call (the worker's hot path),
        where a record's own failure does not fail the others: ``done`` runs on this loop
        once every record is settled, with the
        error of each failed record by its index (empty: all confirmed), or with
        :class:`DeliveryFailed` once the batch was not confirmed within ``timeout_s`` (one
        sweep a second for every such call of the loop)."""
        loop = asyncio.get_running_loop()
        if not records:
            loop.call_soon(done, {})
            return
        then = _Then(done, timeout_s)
        then.batch = self._send(records, partial(self._on_loop, loop, then.settle))
        watched = self._watched.get(loop)
        if watched is None:
            watched = self._watched[loop] = set()
            loop.call_later(1.0, self._sweep, loop)
        watched.add(then)
        if self._wake and not self._flush_soon:
            self._flush_soon = True
            loop.call_soon(self._flush_now)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the ``produce_then`` calls past their time; again in a second while any wait."""
        watched = self._watched.get(loop, set())
        now = time.monotonic()
        for then in [t for t in watched if t.over or t.deadline <= now]:
            watched.discard(then)
            if not then.over:
                assert then.batch is not None
                then.expire(then.batch.unconfirmed(then.timeout_s))
        if watched:
            loop.call_later(1.0, self._sweep, loop)
        else:
            self._watched.pop(loop, None)

    def _confirmed(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
        """A batch is confirmed (any thread): resolve its future on its loop."""
        self._on_loop(loop, partial(_resolve_future, fut))

    def _on_loop(self, loop: asyncio.AbstractEventLoop, call: Callable[[], object]) -> None:
        """Run ``call`` on ``loop`` (from any thread), waking the loop once for every batch
        confirmed before it runs (not once per batch)."""
        with self._ready_lock:
            waiting = self._ready.setdefault(loop, [])
            waiting.append(call)
            first = len(waiting) == 1
        if first:
            try:
                loop.call_soon_threadsafe(self._resolve, loop)
            except RuntimeError:  # the loop is closed: nobody waits any more
                with self._ready_lock:
                    self._ready.pop(loop, None)

    def _resolve(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._ready_lock:
            calls = self._ready.pop(loop, [])
        for call in calls:
            try:
                call()
            except Exception:  # one sender's failure must not leave the others untold
                log.exception("a confirmed send's callback failed")

    def _send(self, records: Sequence[Record], on_done: Callable[[], object]) -> _Batch:
        """Produce ``records``; ``on_done`` runs after the last delivery report."""
        batch = _Batch(len(records), on_done)
        # records without headers go in one call per topic and partition (None: the keyed
        # partitioner's); records with headers one by one
        groups: dict[tuple[str, int | None], list[int]] = {}
        for i, rec in enumerate(records):
            if rec.headers is not None or len(records) == 1:
                try:
                    self._produce_one(rec, partial(batch.on_delivery, i))
                except DeliveryFailed as exc:  # refused at once (e.g. no such partition)
                    batch.settle(i, str(exc))
            else:
                groups.setdefault((rec.topic, rec.partition), []).append(i)
        for (topic, partition), idx in groups.items():
            self._produce_batch(topic, partition, records, idx, batch)
        return batch

    def _produce_batch(
        self,
        topic: str,
        partition: int | None,
        records: Sequence[Record],
        idx: list[int],
        batch: _Batch,
    ) -> None:
        """Records of one topic and partition handed over in one call: librdkafka has them
        all before its sender wakes (with ``linger.ms`` 0, records produced one by one leave
        in several requests, one per wake-up). Keyed records land where ``produce`` puts them
        (checked); the call takes one partition for all its records (it ignores a per-record
        one, checked) and no headers, so records with headers go one by one. It reports a
        full local queue per record (checked: no ``BufferError``), and those records go one
        by one too, waiting for room as :meth:`_produce_one` does."""
        msgs: list[dict[str, Any]] = [
            {
                "value": records[i].value,
                "key": records[i].key,
                "callback": partial(batch.on_delivery, i),
            }
            for i in idx
        ]
        try:
            if partition is None:
                self._producer.produce_batch(topic, msgs)
            else:
                self._producer.produce_batch(topic, msgs, partition=partition)
        except KafkaException as exc:  # nothing was queued
            for i in idx:
                batch.settle(i, f"cannot produce to {topic}: {exc}")
            return
        for i, m in zip(idx, msgs, strict=True):
            err = m.get("_error")
            if err is None:
                continue
            if isinstance(err, KafkaError) and err.code() == KafkaError._QUEUE_FULL:
                try:
                    self._produce_one(records[i], partial(batch.on_delivery, i))
                except DeliveryFailed as exc:
                    batch.settle(i, str(exc))
            else:  # refused at once (e.g. no such partition)
                batch.settle(i, f"cannot produce to {topic}: {err}")

    def _produce_one(self, rec: Record, on_delivery: Any) -> None:
        while True:
            try:
                extra: dict[str, Any] = (
                    {} if rec.partition is None else {"partition": rec.partition}
                )
                self._producer.produce(
                    rec.topic,
                    value=rec.value,
                    key=rec.key,
                    headers=cast(Any, rec.headers),
                    on_delivery=on_delivery,
                    **extra,
                )
                return
            except BufferError:
                time.sleep(0.005)  # local queue full: the poll thread drains it
            except KafkaException as exc:
                raise DeliveryFailed(f"cannot produce to {rec.topic}: {exc}") from None

    def ready(self, bootstrap: str, timeout_s: float, topic: str | None = None) -> None:
        """Wait until the cluster answers this producer's metadata request (its connection
        is then open for the first send), or raise ``KafkaUnavailable``. ``topic``: ask for
        that one topic's metadata, not every topic's (a large cluster's answer is large)."""
        try:
            if self._producer.list_topics(topic, timeout=timeout_s).brokers:
                return
            why: object = "no broker in the metadata"
        except KafkaException as exc:
            why = exc
        raise _unanswered(bootstrap, timeout_s, why)

    def close(self, timeout_s: float = 10.0) -> None:
        if not self._closed.is_set():
            self._producer.flush(timeout_s)
            self._closed.set()
            self._poller.join(timeout=1.0)


def dead_letter_record(
    topic: str,
    *,
    value: bytes | None,
    key: bytes | None,
    origin_topic: str,
    partition: int,
    offset: int,
    reason: str,
    at: float | None = None,
) -> Record:
    """The dead-letter record for a rejected message: the original bytes as the value, and the
    origin and reason in headers, so a fixed consumer can replay it byte for byte."""
    headers: Headers = [
        ("dlq.topic", origin_topic.encode()),
        ("dlq.partition", str(partition).encode()),
        ("dlq.offset", str(offset).encode()),
        ("dlq.reason", reason.encode("utf-8", "replace")[:4000]),
        ("dlq.at", repr(time.time() if at is None else at).encode()),
    ]
    return Record(topic=topic, value=value if value is not None else b"", key=key, headers=headers)


def headers_dict(headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, str]:
    return {k: (v or b"").decode("utf-8", "replace") for k, v in (headers or [])}
