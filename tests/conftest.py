"""Test harness: real Kafka and PostgreSQL, isolated per test.

- Kafka: ``JOBSTREAM_KAFKA_BOOTSTRAP_TEST`` (``make test`` starts a KRaft broker on
  127.0.0.1:19092 with scripts/kafka.sh). Each test gets its own topic prefix and group ids;
  its topics are deleted after it.
- PostgreSQL: ``JOBSTREAM_TEST_PG`` (``make test`` starts one on 127.0.0.1:15432). Each test
  gets its own database, cloned from a migrated template.
- InfluxDB 1.6 (the Telegraf stand-in): ``JOBSTREAM_TEST_INFLUX`` (``make test`` starts one
  on 127.0.0.1:18086, UDP 18089 into database ``udp``). Each test gets its own database.
- A missing service fails the run in CI (``CI=true``) and skips the test elsewhere.
- ``JOBSTREAM_TEST_WORKER_DISPATCH=share`` runs the tests with workers in a Kafka share group
  (``make test`` runs the worker tests that way too).
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import settings as hypothesis_settings
from psycopg import sql

from agents.settings import Settings, load_settings
from agents.store import PostgresJobStore
from streams.kafka import apply_topics, delete_topics, wait_for_broker
from streams.publisher import JobPublisher
from streams.topics import TopicRegistry, load_topics

# No per-example deadline: the machines are shared and noisy, and a timed assertion is not a
# property (an example that is slow once fails the run as "flaky").
hypothesis_settings.register_profile("jobstream", deadline=None)
hypothesis_settings.load_profile("jobstream")

KAFKA = os.environ.get("JOBSTREAM_KAFKA_BOOTSTRAP_TEST", "127.0.0.1:19092")
INFLUX = os.environ.get("JOBSTREAM_TEST_INFLUX", "http://127.0.0.1:18086")
PG = os.environ.get("JOBSTREAM_TEST_PG", "postgresql://postgres@127.0.0.1:15432/postgres")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
WORKER_DISPATCH = os.environ.get("JOBSTREAM_TEST_WORKER_DISPATCH", "group")


def _missing(what: str, exc: Exception) -> None:
    msg = f"{what} is not reachable ({exc}); run `make services` (or `make test`)"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    try:
        wait_for_broker(KAFKA, timeout_s=30)
    except Exception as exc:
        _missing(f"Kafka at {KAFKA}", exc)
    return KAFKA


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    name = f"jobstream_tpl_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(PG, autocommit=True, connect_timeout=10)
    except Exception as exc:
        _missing(f"PostgreSQL at {PG}", exc)
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

        async def migrate() -> None:
            async with PostgresJobStore(_dsn(name)) as store:
                await store.migrate()

        asyncio.run(migrate())
        yield name
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _dsn(database: str) -> str:
    return psycopg.conninfo.make_conninfo(PG, dbname=database)


@pytest.fixture
def database_url(pg_template: str) -> Iterator[str]:
    name = f"jobstream_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(pg_template)
            )
        )
    yield _dsn(name)
    with psycopg.connect(PG, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
def registry(kafka_bootstrap: str, prefix: str) -> Iterator[TopicRegistry]:
    """The test's topics, deleted after it with every other topic of its prefix (pool topics,
    faust's ``<app id>-…`` topics): a broker that keeps every test's partitions slows down
    over a day of runs and takes minutes to start."""
    reg = load_topics(prefix=prefix)
    apply_topics(reg, kafka_bootstrap)
    yield reg
    try:
        delete_topics(kafka_bootstrap, prefix.rstrip("."))
    except Exception as exc:  # clean-up only: never the test's verdict
        warnings.warn(f"topics {prefix}* not deleted: {exc}", stacklevel=1)


KINDS = {
    "touch": {"command": ["touch", "{path}"], "timeout_s": 30, "max_attempts": 1},
    "sleep": {"command": ["sleep", "{seconds}"], "timeout_s": 60, "max_attempts": 3},
    "fail": {
        "command": ["sh", "-c", "echo failing on purpose >&2; exit 3"],
        "timeout_s": 30,
        "max_attempts": 2,
    },
    "argv": {
        "command": [
            "python3",
            "-c",
            "import sys, json; open(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))",
            "{out}",
            "{value}",
        ],
        "timeout_s": 30,
        "max_attempts": 1,
    },
}


def test_settings(
    bootstrap: str, dsn: str, prefix: str, tmp_path: Path, **overrides: object
) -> Settings:
    """Settings of one test: its broker, database and topic prefix, fast timers."""
    return load_settings(
        {},
        **{
            "kafka_bootstrap": bootstrap,
            "database_url": dsn,
            "topic_prefix": prefix,
            "app_id": prefix.rstrip("."),
            "log_dir": str(tmp_path / "logs"),
            "kinds": KINDS,
            "reconcile_interval_s": 2.0,
            "reconcile_after_s": 5.0,
            "heartbeat_interval_s": 1.0,
            "max_payload_bytes": 16 * 1024,
            "worker_dispatch": WORKER_DISPATCH,
            **overrides,
        },
    )


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture
def settings(
    kafka_bootstrap: str, database_url: str, registry: TopicRegistry, prefix: str, tmp_path: Path
) -> Settings:
    return test_settings(kafka_bootstrap, database_url, prefix, tmp_path)


def settings_env(s: Settings) -> dict[str, str]:
    """The environment that gives a subprocess the same settings."""
    import json

    import msgspec

    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    for name, value in msgspec.to_builtins(s).items():
        if value is None:
            continue
        key = "JOBSTREAM_" + name.upper()
        env[key] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def publisher(settings: Settings, registry: TopicRegistry) -> Iterator[JobPublisher]:
    with JobPublisher(settings.require_kafka(), registry=registry) as pub:
        yield pub


class Influx:
    """One test's InfluxDB database: the write URL to hand to the code, and queries."""

    def __init__(self, base: str, db: str) -> None:
        self.base = base
        self.db = db
        self.write_url = f"{base}/write?db={db}&precision=ns"

    def query(self, q: str, db: str | None = None) -> list[dict[str, object]]:
        """Rows of the first statement's series, each a dict with the series' tags merged."""
        url = f"{self.base}/query?" + urllib.parse.urlencode({"db": db or self.db, "q": q})
        with urllib.request.urlopen(url, timeout=10) as resp:
            data = json.load(resp)
        result = data["results"][0]
        if "error" in result:
            raise AssertionError(f"InfluxQL error for {q!r}: {result['error']}")
        rows: list[dict[str, object]] = []
        for series in result.get("series", []):
            for values in series["values"]:
                row = dict(zip(series["columns"], values, strict=True))
                row.update(series.get("tags", {}))
                row["_measurement"] = series["name"]
                rows.append(row)
        return rows

    def command(self, q: str) -> None:
        req = urllib.request.Request(
            f"{self.base}/query?" + urllib.parse.urlencode({"q": q}), method="POST"
        )
        urllib.request.urlopen(req, timeout=10).close()


@pytest.fixture
def influx() -> Iterator[Influx]:
    try:
        urllib.request.urlopen(f"{INFLUX}/ping", timeout=5).close()
    except Exception as exc:
        _missing(f"InfluxDB at {INFLUX}", exc)
    db = f"m_{uuid.uuid4().hex[:10]}"
    handle = Influx(INFLUX, db)
    handle.command(f'CREATE DATABASE "{db}"')
    yield handle
    handle.command(f'DROP DATABASE "{db}"')
