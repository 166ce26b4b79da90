"""Worker pools: which workers may run a kind (FOSSology's host pinning, generalised).

A kind with ``labels`` runs only on workers that carry every one of them; a ``local`` kind
only on a worker on the scheduler's host (every worker carries ``host-<its hostname>``).
Each such label set is a *pool* with its own dispatch topic, ``jobs.dispatch.<pool>`` (the
sorted labels joined by ``_``), created on first use with the settings of ``jobs.dispatch``.
A worker subscribes to ``jobs.dispatch`` and to the topic of every configured pool whose
labels it carries, all in the one worker consumer group: Kafka assigns a topic's partitions
only among the members subscribed to it, so a pool's jobs reach only its workers.

Invariants:
- The pool of a kind is a pure function of the settings, so admission (the producer) and
  workers (the consumers) agree on the topic without talking to each other.
- A job whose pool has no live worker waits in its topic (durably) until one starts;
  ``jobstream why`` says so.
"""

from __future__ import annotations

import asyncio
import re
import socket

from agents.settings import Settings
from streams.kafka import apply_topics, partition_for
from streams.topics import TopicRegistry

_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


def host_label(host: str | None = None) -> str:
    return "host-" + (_UNSAFE.sub("-", host or socket.gethostname()).strip("-.")[:56] or "unknown")


def kind_labels(settings: Settings, kind: str) -> frozenset[str]:
    cfg = settings.kinds.get(kind)
    if cfg is None:
        return frozenset()
    labels = set(cfg.labels)
    if cfg.local:
        labels.add(host_label(settings.scheduler_host))
    return frozenset(labels)


def pool_name(labels: frozenset[str]) -> str | None:
    return "_".join(sorted(labels)) if labels else None


def pool_of(settings: Settings, kind: str) -> str | None:
    return pool_name(kind_labels(settings, kind))


def dispatch_topic(settings: Settings, registry: TopicRegistry, kind: str) -> str:
    """``jobs.dispatch``, or ``jobs.dispatch.<pool>`` for kinds pinned to labelled workers."""
    pool = pool_of(settings, kind)
    base = registry.name("jobs.dispatch")
    return base if pool is None else f"{base}.{pool}"


def dispatch_partition(registry: TopicRegistry, job_id: str) -> int:
    """The partition of a job's dispatches on its pool topic (every pool topic has the
    partitions of ``jobs.dispatch``): set explicitly, so anyone can tell which worker owns a
    dispatch still in Kafka from the workers' assigned partitions."""
    return partition_for(job_id.encode(), registry["jobs.dispatch"].partitions)


def heartbeat_partition(registry: TopicRegistry, worker: str) -> int:
    """The partition of a worker's heartbeats (set explicitly): the monitor judges a worker's
    silence only once that partition is recorded to its end."""
    return partition_for(worker.encode(), registry["workers.heartbeat"].partitions)


def dispatch_place(settings: Settings, registry: TopicRegistry, kind: str, job_id: str) -> str:
    """``topic[partition]`` of a job's dispatch, as workers list their assignment."""
    return f"{dispatch_topic(settings, registry, kind)}[{dispatch_partition(registry, job_id)}]"


def configured_pools(settings: Settings) -> set[str]:
    return {p for k in settings.kinds if (p := pool_of(settings, k)) is not None}


def worker_labels(settings: Settings, extra: list[str] | None = None) -> frozenset[str]:
    return frozenset([*settings.worker_labels, *(extra or []), host_label()])


def pools_served(settings: Settings, labels: frozenset[str]) -> set[str]:
    """The configured pools a worker carrying ``labels`` serves."""
    return {
        p
        for k in settings.kinds
        if (ls := kind_labels(settings, k)) and ls <= labels and (p := pool_name(ls)) is not None
    }


async def ensure_pool_topics(
    settings: Settings, registry: TopicRegistry, pools: set[str], known: set[str]
) -> None:
    """Create the dispatch topics of ``pools`` not in ``known`` (then add them to it)."""
    todo = pools - known
    if not todo:
        return
    reg = registry.only_pools(todo)
    await asyncio.to_thread(
        apply_topics, reg, settings.require_kafka(), settings.kafka_config, create=True
    )
    known.update(todo)
