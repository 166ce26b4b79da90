"""Per-attempt state end to end (real Kafka, PostgreSQL, scheduler and worker processes):
a job cancelled and retried runs its new attempt, a cancel replayed after a retry cancels
nothing, a new attempt is not dropped because an older one still runs on the same worker,
liveness is judged by the receiver's clock, an error after the start is reported as that
attempt's failure, and a stopped worker's jobs are retried."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agents.settings import Settings
from streams.events import Control, JobSpec, encode
from streams.publisher import JobPublisher
from tests.conftest import settings_env
from tests.helpers import cli, eventually
from tests.integration.test_workers import attempts_file, cluster, db, job, ws  # noqa: F401

pytestmark = pytest.mark.timeout(300)


def _running(s: Settings, job_id: str, attempt: int) -> bool:
    j = job(s, job_id)
    return j.get("state") == "running" and j.get("attempt") == attempt


def test_a_cancelled_running_job_that_is_retried_runs_its_new_attempt(
    ws: Settings,  # noqa: F811
    publisher: JobPublisher,
    tmp_path: Path,
) -> None:
    """Item 1: the worker remembered the cancel by job id and skipped attempt 2 (the job
    stayed ``dispatched`` forever, holding its slot)."""
    out = tmp_path / "s.txt"
    env = settings_env(ws)
    with cluster(ws, tmp_path):
        publisher.submit(
            JobSpec(id="s", tenant="acme", kind="mark", args={"out": str(out), "seconds": "30"})
        )
        eventually(lambda: _running(ws, "s", 1), 60, what="s running")
        assert cli("cancel", "s", env=env).returncode == 0
        eventually(lambda: job(ws, "s").get("state") == "cancelled", 30, what="s cancelled")
        assert cli("retry", "s", env=env).returncode == 0
        eventually(lambda: _running(ws, "s", 2), 30, what="attempt 2 running")
        assert attempts_file(out)[::2] == ["1", "2"]
        # cancelled again and retried again: the worker keeps each cancel to its attempt
        assert cli("cancel", "s", env=env).returncode == 0
        eventually(lambda: job(ws, "s").get("state") == "cancelled", 30, what="cancelled again")
        assert cli("retry", "s", env=env).returncode == 0
        eventually(lambda: _running(ws, "s", 3), 30, what="attempt 3 running")
    assert db(ws, "SELECT count(*) FROM job_holds WHERE job_id = 's'")[0][0] in (0, 1)


def test_a_cancel_and_a_retry_sent_together_apply_in_order(
    ws: Settings,  # noqa: F811
    publisher: JobPublisher,
    tmp_path: Path,
) -> None:
    """Item 6: the retry ran before the cancel it followed had reached the job (the cancel
    went through ``jobs.events``), so it was a silent no-op and the job ended cancelled."""
    out = tmp_path / "t.txt"
    with cluster(ws, tmp_path):
        publisher.submit(
            JobSpec(id="t", tenant="acme", kind="mark", args={"out": str(out), "seconds": "30"})
        )
        eventually(lambda: _running(ws, "t", 1), 60, what="t running")
        for action in ("cancel", "retry"):  # back to back, as a script would send them
            cmd = Control(action=action, scope="job", name="t", by="test", at=time.time())
            publisher.send_raw("jobs.control", encode(cmd), b"t")
        eventually(lambda: _running(ws, "t", 2), 60, what="attempt 2 running")
        assert attempts_file(out)[::2] == ["1", "2"]
