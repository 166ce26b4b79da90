"""Admission control on real Kafka and PostgreSQL: exact rate limits across two scheduler
processes and a kill, semaphores, pause/resume and run-time priority through the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import pytest

from agents.settings import Settings
from streams.events import JobSpec
from streams.publisher import JobPublisher
from tests.conftest import settings_env
from tests.helpers import Proc, cli, eventually, running

pytestmark = pytest.mark.timeout(240)


def states(dsn: str, ids: list[str]) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return dict(
            conn.execute("SELECT id, state FROM jobs WHERE id = ANY(%s)", (ids,)).fetchall()
        )


def windows_ok(times: list[float], limit: int, window: float) -> bool:
    times = sorted(times)
    return all(sum(1 for t in times if x - window < t <= x) <= limit for x in times)


def test_per_tenant_limit_holds_exactly_at_admission_and_start_across_two_schedulers_and_a_kill(
    settings: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    s = settings.replace(
        rate_limits=[{"scope": "tenant", "limit": 5, "window_s": 1.0}],  # type: ignore[list-item]
    )
    from agents.settings import load_settings

    s = load_settings(settings_env(s))
    env = settings_env(s)
    with running(env, tmp_path, slots=8) as procs:
        second = Proc(["scheduler"], env, tmp_path / "scheduler-2.log")
        try:
            time.sleep(6)  # both join the group and share jobs.ready's partitions
            ids = []
            for tenant in ("acme", "beta", "gamma"):
                jobs = [JobSpec(id=f"{tenant}-{i}", tenant=tenant, kind="noop") for i in range(30)]
                publisher.submit_many(jobs)
                ids += [j.id for j in jobs]
            time.sleep(2.5)
            second.kill()  # kill -9 mid-run: its tenants move to the survivor
            dsn = s.require_database()
            eventually(
                lambda: list(states(dsn, ids).values()).count("succeeded") == len(ids),
                150,
                what="all jobs succeeded",
            )
        finally:
            second.stop(5)
        assert procs["scheduler"].p.poll() is None
    with psycopg.connect(dsn) as conn:
        log = conn.execute("SELECT key, at FROM rate_log ORDER BY key, at").fetchall()
        # the workers' starts, recorded with the entries (epoch seconds, unrounded)
        started = conn.execute("SELECT key, started_at FROM rate_log ORDER BY key").fetchall()
        attempts = conn.execute(
            "SELECT max(attempt) FROM jobs WHERE id = ANY(%s)", (ids,)
        ).fetchone()
    by_key: dict[str, list[float]] = {}
    for key, at in log:
        by_key.setdefault(key, []).append(at)
    assert sorted(by_key) == ["tenant:acme", "tenant:beta", "tenant:gamma"]
    for key, times in by_key.items():
        assert len(times) == 30, key  # each job admitted once
        assert windows_ok(times, 5, 1.0), (key, times)
        # utilisation: 30 admissions at 5/s cannot take less than 5 windows
        assert max(times) - min(times) >= 5.0 - 1e-6
    assert attempts is not None and attempts[0] == 1
    # held at the start too: no window of any tenant holds more than 5 starts
    starts: dict[str, list[float]] = {}
    for key, at in started:
        assert at is not None, key  # every admitted job's start is in the log
        starts.setdefault(key, []).append(at)
    for key, times in starts.items():
        assert windows_ok(times, 5, 1.0), (key, sorted(times))


def test_semaphore_pause_resume_priority_and_why(
    settings: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    from agents.settings import load_settings

    s = load_settings(settings_env(settings.replace(resources={"api": 1})))
    env = settings_env(s)
    dsn = s.require_database()

    def job(i: str, tenant: str = "acme", seconds: str = "1") -> JobSpec:
        return JobSpec(
            id=i, tenant=tenant, kind="sleep", args={"seconds": seconds}, resources=["api"]
        )

    with running(env, tmp_path, slots=4):
        time.sleep(5)
        assert (
            cli("pause", "--tenant", "paused-co", "--reason", "maintenance", env=env).returncode
            == 0
        )
        publisher.submit(job("first", seconds="8"))  # outlasts the CLI calls under load
        eventually(lambda: states(dsn, ["first"]).get("first") == "running", 60, what="first runs")
        publisher.submit(job("low"))
        publisher.submit(job("high"))
        publisher.submit(job("held", tenant="paused-co"))
        eventually(
            lambda: json.loads(cli("why", "low", "--json", env=env).stdout).get("gate") is not None,
            30,
            what="low has a gate",
        )
        why = json.loads(cli("why", "low", "--json", env=env).stdout)
        assert why["gate"].startswith("semaphore: api 1/1"), why
        assert cli("priority", "high", "20", env=env).returncode == 0
        eventually(
            lambda: (
                states(dsn, ["first", "low", "high"])
                == {"first": "succeeded", "low": "succeeded", "high": "succeeded"}
            ),
            60,
            what="api jobs done",
        )
        held = json.loads(cli("why", "held", "--json", env=env).stdout)
        assert held["state"] == "ready" and held["gate"].startswith("paused: tenant:paused-co")
        assert held["paused_by"][0]["reason"] == "maintenance"
        assert cli("resume", "--tenant", "paused-co", env=env).returncode == 0
        eventually(lambda: states(dsn, ["held"]) == {"held": "succeeded"}, 60, what="held ran")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, extract(epoch from started_at)::float8, "
            "extract(epoch from finished_at)::float8 "
            "FROM jobs WHERE resources = '{api}' ORDER BY started_at"
        ).fetchall()
        holds = conn.execute("SELECT count(*) FROM job_holds").fetchone()
        used = conn.execute("SELECT name, used FROM semaphores WHERE used > 0").fetchall()
    order = [r[0] for r in rows]
    assert order.index("high") < order.index("low"), order  # the run-time priority counted
    for (_, _, end), (_, start, _) in zip(rows, rows[1:], strict=False):
        assert start >= end - 0.05, rows  # api (capacity 1) never held twice at once
    assert holds == (0,) and used == []  # everything given back
