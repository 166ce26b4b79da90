"""Time on real services: a delayed job waits in PostgreSQL (gate ``scheduled``) and starts at
its time; a cancelled one never starts; a schedule ticking every second keeps exactly one job
per tick while one of two schedulers is killed."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agents.settings import Settings
from streams.events import JobSpec
from streams.publisher import JobPublisher
from tests.conftest import settings_env
from tests.helpers import Proc, cli, eventually, running

pytestmark = pytest.mark.timeout(240)


def job(env: dict[str, str], job_id: str) -> dict[str, Any]:
    r = cli("job", job_id, "--json", env=env)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_a_delayed_job_waits_scheduled_then_starts_at_its_time(
    settings: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    env = settings_env(settings)
    with running(env, tmp_path, slots=2):
        publisher.submit(JobSpec(id="later", tenant="t", kind="noop", delay_s=2.0))
        publisher.submit(JobSpec(id="never", tenant="t", kind="noop", delay_s=60.0))
        publisher.submit(JobSpec(id="now", tenant="t", kind="noop"))
        # a dependent's own time is a further condition: released by "now", it still waits
        publisher.submit(
            JobSpec(
                id="after-now",
                tenant="t",
                kind="noop",
                depends_on=["now"],
                run_at=time.time() + 3.0,
            )
        )
        waiting = eventually(lambda: job(env, "never").get("gate"), 60, what="gate written")
        assert waiting.startswith("scheduled: until "), waiting
        why = cli("why", "never", env=env).stdout
        assert "scheduled: not before" in why, why
        assert cli("cancel", "never", env=env).returncode == 0
        done = eventually(
            lambda: (r := job(env, "later")).get("state") == "succeeded" and r, 60, what="later"
        )
        now_done = job(env, "now")
        assert now_done["state"] == "succeeded"
        accepted, run_at = epoch(done["accepted_at"]), epoch(done["run_at"])
        started = epoch(done["started_at"])
        assert 1.5 <= run_at - accepted <= 2.5  # delay_s counts from acceptance
        assert started >= run_at  # not before its time
        assert started - run_at < 1.0  # and within admission's latency after it
        assert epoch(now_done["started_at"]) < run_at  # the others did not wait for it
        eventually(lambda: job(env, "never").get("state") == "cancelled", 30, what="cancelled")
        dep = eventually(
            lambda: (r := job(env, "after-now")).get("state") == "succeeded" and r, 60, what="dep"
        )
        assert epoch(dep["started_at"]) >= epoch(dep["run_at"])  # not when "now" released it
        assert epoch(dep["run_at"]) > epoch(now_done["finished_at"])
    assert job(env, "never").get("started_at") is None


def test_a_schedule_every_second_gives_one_job_per_tick_while_a_scheduler_dies(
    settings: Settings, tmp_path: Path, database_url: str
) -> None:
    env = settings_env(settings)
    with running(env, tmp_path, slots=4) as procs:
        second = Proc(["scheduler"], env, tmp_path / "scheduler2.log")
        try:
            r = cli(
                "schedule", "add", "every-second", "noop", "--cron", "* * * * * *",
                "--catch-up", "all", "--json", env=env,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            created = time.time()
            listed = json.loads(cli("schedule", "list", "--json", env=env).stdout)
            assert [s["name"] for s in listed] == ["every-second"]
            time.sleep(8)
            procs["scheduler"].kill()  # in the middle: the other scheduler goes on
            window_end = created + 20
            time.sleep(max(0.0, window_end - time.time()) + 3)
            assert cli("schedule", "pause", "every-second", env=env).returncode == 0
        finally:
            second.stop()
    with psycopg.connect(database_url) as conn:
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM jobs WHERE id LIKE 'schedule:every-second:%%' ORDER BY id"
            )
        ]
        row = conn.execute(
            "SELECT last_tick, submitted FROM schedules WHERE name = 'every-second'"
        ).fetchone()
    ticks = sorted(epoch(i.split(":", 2)[2].replace("Z", "+00:00")) for i in ids)
    window = [t for t in ticks if created < t <= created + 20]
    assert len(window) == 20, window  # one job per tick of the 20 s: no gap
    assert all(b - a == 1.0 for a, b in zip(window, window[1:], strict=False))
    assert len(set(ids)) == len(ids)
    assert row is not None and row[1] >= len(ids)  # each submitted (maybe twice), once a job
