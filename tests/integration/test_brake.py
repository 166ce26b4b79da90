"""The host-load feedback loop on real Kafka and PostgreSQL: overload telemetry on
telemetry.hosts (Telegraf's JSON) cuts admission's slot capacity step by step and jobs run
at the reduced concurrency; when telemetry stops, the static capacity returns."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psycopg
import pytest

from agents.core.depth import UNITS
from agents.settings import Settings, load_settings
from streams.events import JobSpec
from streams.publisher import JobPublisher
from tests.conftest import settings_env
from tests.helpers import cli, eventually, running

pytestmark = pytest.mark.timeout(240)


def capacity(dsn: str) -> int:
    """The ``slots`` semaphore's capacity in whole slots (it counts UNITS per slot)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT capacity FROM semaphores WHERE name = 'slots'").fetchone()
        return int(row[0]) // UNITS if row else -1


def max_overlap(dsn: str, ids: list[str]) -> int:
    with psycopg.connect(dsn) as conn:
        spans = conn.execute(
            "SELECT extract(epoch from started_at), extract(epoch from finished_at) FROM jobs "
            "WHERE id = ANY(%s) AND state = 'succeeded'",
            (ids,),
        ).fetchall()
    points = sorted([(float(a), 1) for a, _ in spans] + [(float(b), -1) for _, b in spans])
    best = cur = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


def test_overload_slows_admission_and_static_capacity_returns_when_telemetry_stops(
    settings: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    s = load_settings(
        settings_env(
            settings.replace(
                capacity_factor=1.0,
                brake_interval_s=0.5,
                brake_stale_after_s=3.0,
                brake_cpu_busy_pct=90.0,
            )
        )
    )
    env = settings_env(s)
    dsn = s.require_database()
    stop = threading.Event()

    def overload() -> None:
        while not stop.is_set():
            metric = {
                "name": "cpu",
                "tags": {"cpu": "cpu-total", "host": "busy-host"},
                "fields": {"usage_idle": 1.5},
                "timestamp": int(time.time()),
            }
            publisher.send_raw("telemetry.hosts", json.dumps(metric).encode(), b"busy-host")
            stop.wait(0.3)

    with running(env, tmp_path, slots=6):
        eventually(lambda: capacity(dsn) == 6, 60, what="static capacity from heartbeats")
        publisher.send_raw("telemetry.hosts", b"not telemetry", b"x")
        feeder = threading.Thread(target=overload, daemon=True)
        feeder.start()
        try:
            eventually(lambda: capacity(dsn) == 1, 60, what="brake down to 1 slot")
            braked = [f"b{i}" for i in range(8)]
            publisher.submit_many(
                JobSpec(id=i, tenant="acme", kind="sleep", args={"seconds": "0.4"}) for i in braked
            )
            seen: list[str] = []

            def why_braked() -> str | None:
                with psycopg.connect(dsn) as conn:
                    queued = conn.execute(
                        "SELECT id FROM jobs WHERE id = ANY(%s) AND state = 'ready' "
                        "ORDER BY ready_at DESC LIMIT 1",
                        (braked,),
                    ).fetchone()
                if queued is None:
                    return None
                r = cli("why", queued[0], env=env)
                seen.append(r.stdout + r.stderr)
                return r.stdout if "brake:" in r.stdout else None

            try:
                why = eventually(why_braked, 10, what="why shows the brake")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; outputs: {seen}") from None
            assert "held at 1 of 6" in why and "busy-host cpu 98% busy" in why, why
            eventually(
                lambda: max_overlap(dsn, braked) >= 1 and _count(dsn, braked) == len(braked),
                60,
                what="braked jobs done",
            )
            assert max_overlap(dsn, braked) == 1  # one at a time under the brake
        finally:
            stop.set()
            feeder.join()
        eventually(lambda: capacity(dsn) == 6, 30, what="static capacity back")
        free = [f"f{i}" for i in range(6)]
        publisher.submit_many(
            JobSpec(id=i, tenant="acme", kind="sleep", args={"seconds": "1"}) for i in free
        )
        eventually(lambda: _count(dsn, free) == len(free), 60, what="free jobs done")
    assert max_overlap(dsn, free) >= 3  # concurrency is back
    with psycopg.connect(dsn) as conn:
        (bad,) = conn.execute(
            "SELECT count(*) FROM dead_letters WHERE reason LIKE 'telemetry:%%'"
        ).fetchone() or (0,)
    assert bad == 1


def _count(dsn: str, ids: list[str]) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM jobs WHERE id = ANY(%s) AND state = 'succeeded'", (ids,)
        ).fetchone()
    return int(row[0]) if row else 0
