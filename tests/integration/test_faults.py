"""Faults on real services: PostgreSQL and the Kafka broker stopped and restarted under load.
The agents back off and resume (no crash loop), every job ends once, and the invariant
checker passes. Runs on its own PostgreSQL (15433) and broker (19192), started here, so the
shared services of the rest of the suite are never disturbed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from agents.settings import Settings
from agents.store import PostgresJobStore
from agents.store.checks import check
from bench.harness import service
from streams.events import JobSpec
from streams.kafka import apply_topics, wait_for_broker
from streams.publisher import JobPublisher
from streams.topics import load_topics
from tests.conftest import settings_env, test_settings
from tests.helpers import eventually, running

pytestmark = pytest.mark.timeout(420)
PG_PORT, KAFKA_PORT = "15433", "19192"


@pytest.fixture(scope="module")
def own() -> Iterator[tuple[str, str]]:
    service("postgres.sh", "start", PG_PORT=PG_PORT)
    service("kafka.sh", "start", KAFKA_PORT=KAFKA_PORT)
    try:
        yield f"postgresql://postgres@127.0.0.1:{PG_PORT}/postgres", f"127.0.0.1:{KAFKA_PORT}"
    finally:
        service("kafka.sh", "stop", KAFKA_PORT=KAFKA_PORT)
        service("postgres.sh", "stop", PG_PORT=PG_PORT)


@pytest.fixture
def fs(own: tuple[str, str], tmp_path: Path) -> Settings:
    admin_dsn, bootstrap = own
    name = f"faults_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)

    async def migrate() -> None:
        async with PostgresJobStore(dsn) as store:
            await store.migrate()

    asyncio.run(migrate())
    prefix = f"f{uuid.uuid4().hex[:8]}."
    wait_for_broker(bootstrap, timeout_s=60)
    apply_topics(load_topics(prefix=prefix), bootstrap)
    return test_settings(bootstrap, dsn, prefix, tmp_path, worker_lost_after_s=20.0, status_bind="")


def settled(s: Settings, n: int) -> bool:
    try:
        with psycopg.connect(s.require_database(), connect_timeout=3) as conn:
            row = conn.execute(
                "SELECT count(*) FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')"
            ).fetchone()
        return bool(row and row[0] == n)
    except psycopg.OperationalError:
        return False


def load(s: Settings, pub: JobPublisher, start: int, n: int) -> list[str]:
    ids = [f"j{i}" for i in range(start, start + n)]
    pub.submit_many(
        JobSpec(id=i, tenant=f"t{k % 3}", kind="sleep", args={"seconds": "0.05"})
        for k, i in enumerate(ids)
    )
    return ids


def test_postgres_stopped_and_restarted_under_load(fs: Settings, tmp_path: Path) -> None:
    env = settings_env(fs)
    registry = load_topics(prefix=fs.topic_prefix)
    with (
        running(env, tmp_path, slots=8) as procs,
        JobPublisher(fs.require_kafka(), registry=registry) as pub,
    ):
        load(fs, pub, 0, 150)
        time.sleep(2)
        service("postgres.sh", "stop", PG_PORT=PG_PORT)
        load(fs, pub, 150, 150)  # accepted by Kafka while the database is down
        time.sleep(6)
        service("postgres.sh", "start", PG_PORT=PG_PORT)
        eventually(lambda: settled(fs, 300), 180, what="all 300 jobs done after the restart")
        assert all(p.p.poll() is None for p in procs.values()), "a process died"
    assert check(fs.require_database(), settled=True) == []


def test_kafka_broker_stopped_and_restarted_under_load(fs: Settings, tmp_path: Path) -> None:
    env = settings_env(fs)
    registry = load_topics(prefix=fs.topic_prefix)
    with running(env, tmp_path, slots=8) as procs:
        with JobPublisher(fs.require_kafka(), registry=registry) as pub:
            load(fs, pub, 0, 150)
        time.sleep(2)
        service("kafka.sh", "stop", KAFKA_PORT=KAFKA_PORT)
        time.sleep(5)
        service("kafka.sh", "start", KAFKA_PORT=KAFKA_PORT)
        with JobPublisher(fs.require_kafka(), registry=registry) as pub:
            load(fs, pub, 150, 150)
        eventually(lambda: settled(fs, 300), 240, what="all 300 jobs done after the restart")
        assert all(p.p.poll() is None for p in procs.values()), "a process died"
    assert check(fs.require_database(), settled=True) == []
