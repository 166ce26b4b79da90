"""Per-attempt state end to end (real Kafka, PostgreSQL, scheduler and worker processes):
a job cancelled and retried runs its new attempt, a cancel replayed after a retry cancels
nothing, a new attempt is not dropped because an older one still runs on the same worker,
liveness is judged by the receiver's clock, an error after the start is reported as that
attempt's failure, and a stopped worker's jobs are retried."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from agents.settings import Settings, load_settings
from bench.clockskew import skewed_env
from streams.events import (
    Control,
    JobFailed,
    JobSpec,
    JobStarted,
    JobSucceeded,
    WorkerHeartbeat,
    WorkflowSubmitted,
    encode,
)
from streams.publisher import JobPublisher
from tests.conftest import settings_env
from tests.helpers import Proc, cli, eventually
from tests.integration.test_workers import (  # noqa: F401
    _alive,
    add_worker,
    attempts_file,
    cluster,
    db,
    job,
    worker_id,
    ws,
)

pytestmark = pytest.mark.timeout(300)


def _running(s: Settings, job_id: str, attempt: int) -> bool:
    j = job(s, job_id)
    return j.get("state") == "running" and j.get("attempt") == attempt


def _run_and_declare_lost(
    s: Settings, publisher: JobPublisher, job_id: str, out: Path, seconds: int
) -> str:
    """Run a ``mark`` job; once attempt 1 runs, publish what the monitor publishes for a
    running job whose worker it declared lost; return once attempt 2 runs (on the same
    worker when it is the only one) with attempt 1's worker."""
    args = {"out": str(out), "seconds": str(seconds)}
    publisher.submit(JobSpec(id=job_id, tenant="acme", kind="mark", args=args))
    eventually(lambda: _running(s, job_id, 1), 60, what=f"{job_id} running")
    worker = str(job(s, job_id)["worker"])
    lost = JobFailed(
        job_id=job_id,
        attempt=1,
        worker=worker,
        at=time.time(),
        error=f"worker {worker} lost: no heartbeat",
        retryable=True,
        backoff=False,
    )
    publisher.send_raw("jobs.events", encode(lost), job_id.encode())
    eventually(lambda: _running(s, job_id, 2), 30, what="attempt 2 running")
    return worker


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


def test_a_new_attempt_is_run_while_an_older_one_still_runs_on_the_same_worker(
    ws: Settings,  # noqa: F811
    publisher: JobPublisher,
    tmp_path: Path,
) -> None:
    """Item 2: the monitor's retry of attempt 1 (as for a worker it judged lost) lands on the
    worker that still runs attempt 1; it was skipped (``job_id in running``), its offset
    committed, and the job stayed ``dispatched`` forever."""
    out = tmp_path / "n.txt"
    with cluster(ws, tmp_path):
        _run_and_declare_lost(ws, publisher, "n", out, seconds=30)
        lines = attempts_file(out)
        assert lines[::2] == ["1", "2"]
        assert lines[1] == lines[3]  # one worker (the processes' parent) ran both attempts


def test_liveness_is_judged_by_the_receivers_clock(
    ws: Settings,  # noqa: F811
    publisher: JobPublisher,
    tmp_path: Path,
) -> None:
    """Item 3: heartbeats stored the worker's own clock as ``last_seen`` and PostgreSQL
    judged it against ``now()``: a worker 30 s behind was declared lost on every tick, and
    each of its running jobs got a counted failure."""
    env = settings_env(ws)
    env.update(skewed_env(-30.0, env))
    out = tmp_path / "k.txt"
    with cluster(ws, tmp_path, workers=0):
        behind = Proc(["worker", "--slots", "2"], env, tmp_path / "behind.log")
        try:
            publisher.submit(
                JobSpec(id="k", tenant="acme", kind="mark", args={"out": str(out), "seconds": "9"})
            )
            eventually(lambda: job(ws, "k").get("state") == "succeeded", 90, what="k done")
            assert job(ws, "k")["attempt"] == 1, attempts_file(out)
            lost = db(ws, "SELECT count(*) FROM workers WHERE lost_at IS NOT NULL")[0][0]
            assert lost == 0
        finally:
            behind.stop(timeout=30)


def test_an_error_after_the_start_is_reported_as_the_attempts_failure(
    ws: Settings,  # noqa: F811
    publisher: JobPublisher,
    tmp_path: Path,
) -> None:
    """Item 4: opening the job's log raised outside any handler (a tenant's log directory
    deleted after first use, or a path that cannot be a directory): the job stayed
    ``running`` forever while its worker lived on."""
    logs = Path(ws.log_dir)
    with cluster(ws, tmp_path):
        publisher.submit(
            JobSpec(id="l1", tenant="acme", kind="touch", args={"path": str(tmp_path / "l1")})
        )
        eventually(lambda: job(ws, "l1").get("state") == "succeeded", 60, what="l1 done")
        shutil.rmtree(logs / "acme")  # an operator cleaning up, a tmp reaper
        publisher.submit(
            JobSpec(id="l2", tenant="acme", kind="touch", args={"path": str(tmp_path / "l2")})
        )
        eventually(lambda: job(ws, "l2").get("state") == "succeeded", 60, what="l2 done")
        (logs / "blocked").write_text("a file where the tenant's log directory goes")
        publisher.submit(
            JobSpec(
                id="l3",
                tenant="blocked",
                kind="touch",
                args={"path": str(tmp_path / "l3")},
                max_attempts=2,
            )
        )
        eventually(lambda: job(ws, "l3").get("state") == "failed", 60, what="l3 failed")
    assert "could not run the job" in str(job(ws, "l3")["error"])
    assert job(ws, "l3")["attempt"] == 2  # retryable: the next attempt may find a healthy disk


def test_a_workflow_member_over_the_per_job_limit_is_rejected_at_intake(
    ws: Settings,  # noqa: F811
    publisher: JobPublisher,
    tmp_path: Path,
) -> None:
    """Item 5: intake checked only the workflow's limit; the worker rejected the member's
    dispatch and it stayed ``dispatched`` forever with its holds, its dependent waiting."""
    big = "x" * (ws.max_payload_bytes + 1000)
    flow = WorkflowSubmitted(
        id="wbig",
        jobs=[
            JobSpec(id="wbig-a", tenant="acme", kind="touch", args={"path": big}, group="wbig"),
            JobSpec(
                id="wbig-b",
                tenant="acme",
                kind="touch",
                args={"path": "/nonexistent/z"},
                group="wbig",
                depends_on=["wbig-a"],
            ),
        ],
        submitted_at=time.time(),
    )
    with cluster(ws, tmp_path):
        publisher.send_raw("jobs.dependent", encode(flow), b"wbig")
        reason = eventually(
            lambda: db(ws, "SELECT reason FROM dead_letters WHERE reason LIKE %s", "%wbig-a%"),
            60,
            what="the workflow dead-lettered",
        )
    assert "over the limit" in str(reason[0][0])
    assert db(ws, "SELECT count(*) FROM jobs WHERE id LIKE 'wbig%%'")[0][0] == 0


def test_jobs_of_a_worker_that_stopped_without_reporting_them_are_retried(
    ws: Settings,  # noqa: F811
    publisher: JobPublisher,
    tmp_path: Path,
) -> None:
    """Item 7: a worker whose main loop raised sent a ``stopped`` heartbeat from its
    ``finally`` with jobs unreported; stopped workers were never judged, so those jobs
    stayed ``running`` forever."""
    out = tmp_path / "w.txt"
    with cluster(ws, tmp_path, workers=2):
        publisher.submit(
            JobSpec(id="w", tenant="acme", kind="mark", args={"out": str(out), "seconds": "15"})
        )  # long enough that attempt 1 cannot have ended (and reported) when it is stopped
        eventually(lambda: _running(ws, "w", 1), 60, what="w running")
        worker = str(job(ws, "w")["worker"])
        pid = int(db(ws, "SELECT pid FROM workers WHERE id = %s", worker)[0][0])
        os.kill(pid, signal.SIGSTOP)  # it runs nothing more and says nothing more...
        try:
            beat = WorkerHeartbeat(  # ...but its last word was "stopped"
                worker=worker,
                host="h",
                slots_total=2,
                slots_free=2,
                running=[],
                at=time.time(),
                state="stopped",
                pid=pid,
            )
            publisher.send_raw("workers.heartbeat", encode(beat), worker.encode())
            eventually(lambda: job(ws, "w").get("state") == "succeeded", 60, what="w retried")
        finally:
            os.kill(pid, signal.SIGCONT)
    assert job(ws, "w")["attempt"] == 2


def test_a_cancelled_attempt_keeps_its_resource_until_its_end_is_reported(
    ws: Settings,  # noqa: F811
    publisher: JobPublisher,
    tmp_path: Path,
) -> None:
    """Item 9: the cancel of a dispatched attempt gave its resource back at once, so another
    job took it while the cancelled dispatch still waited in a worker's queue; a worker that
    had not seen the cancel ran both. Now the attempt's holds stay until its end is reported
    (a worker that drops the dispatch, or runs and stops it, says so)."""
    s = load_settings(settings_env(ws.replace(resources={"lic": 1})))
    out = tmp_path / "a.txt"
    with cluster(s, tmp_path, workers=1) as (_, (worker,)):
        pid = int(
            eventually(lambda: db(s, "SELECT pid FROM workers WHERE state = 'running'"), 60)[0][0]
        )
        os.kill(pid, signal.SIGSTOP)  # the dispatch waits for it
        try:
            publisher.submit(
                JobSpec(
                    id="ra",
                    tenant="acme",
                    kind="mark",
                    args={"out": str(out), "seconds": "3"},
                    resources=["lic"],
                )
            )
            eventually(lambda: job(s, "ra").get("state") == "dispatched", 30, what="ra out")
            assert cli("cancel", "ra", env=settings_env(s)).returncode == 0
            eventually(lambda: job(s, "ra").get("state") == "cancelled", 30, what="cancelled")
            publisher.submit(
                JobSpec(
                    id="rb",
                    tenant="acme",
                    kind="touch",
                    args={"path": str(tmp_path / "rb")},
                    resources=["lic"],
                )
            )
            time.sleep(2)  # admission had every chance to give rb the resource
            assert job(s, "rb")["state"] == "ready"
            used = db(s, "SELECT used FROM semaphores WHERE name LIKE %s", "%lic")
            assert used == [(1,)]
        finally:
            os.kill(pid, signal.SIGCONT)
        shared = False
        deadline = time.monotonic() + 60
        while job(s, "rb").get("state") != "succeeded" and time.monotonic() < deadline:
            ra_pid = Path(f"{out}.pid")
            if (tmp_path / "rb").exists() and ra_pid.exists():
                shared = shared or _alive(int(ra_pid.read_text().strip() or 0))
            time.sleep(0.05)
        assert job(s, "rb")["state"] == "succeeded"
    assert not shared  # rb never ran beside the cancelled attempt's process
    assert db(s, "SELECT coalesce(sum(amount), 0) FROM job_holds")[0][0] == 0


def test_events_of_a_superseded_attempt_change_nothing_while_the_next_one_runs(
    ws: Settings,  # noqa: F811
    publisher: JobPublisher,
    tmp_path: Path,
) -> None:
    """The SQL attempt guard itself (not terminal absorption): attempt 2 is running when a
    start, a success and a non-retryable failure of attempt 1 arrive late."""
    out = tmp_path / "g.txt"
    with cluster(ws, tmp_path):
        worker = _run_and_declare_lost(ws, publisher, "g", out, seconds=6)
        late = [
            JobStarted(job_id="g", attempt=1, worker="ghost", at=time.time()),
            JobSucceeded(
                job_id="g", attempt=1, worker="ghost", at=time.time(), exit_code=0, duration_s=1
            ),
            JobFailed(
                job_id="g", attempt=1, worker="ghost", at=time.time(), error="x", retryable=False
            ),
        ]
        for ev in late:
            publisher.send_raw("jobs.events", encode(ev), b"g")
        time.sleep(2)  # well past the dependency stage's batch
        assert _running(ws, "g", 2), job(ws, "g")
        eventually(lambda: job(ws, "g").get("state") == "succeeded", 60, what="g done")
    j = job(ws, "g")
    assert j["attempt"] == 2 and j["worker"] == worker
    succeeded = db(ws, "SELECT attempt FROM job_history WHERE job_id = 'g' AND event = 'succeeded'")
    assert succeeded == [(2,)]


def test_a_dispatch_no_live_worker_consumes_is_handed_back_and_runs_once_a_worker_comes(
    ws: Settings,  # noqa: F811
    publisher: JobPublisher,
    tmp_path: Path,
) -> None:
    """A dispatch on a pool topic that no live worker consumed stayed ``dispatched`` with its
    slot for as long as the pool had no worker. It is handed back past the liveness bound
    (not counted); the old dispatches a worker of the pool reads later are dropped or
    stopped (their starts are fenced), and the job runs to success on its current attempt."""
    out = tmp_path / "g.txt"
    with cluster(ws, tmp_path, workers=1) as (_, (plain,)):
        worker_id(ws, plain)
        publisher.submit(
            JobSpec(
                id="g", tenant="acme", kind="pinned-mark", args={"out": str(out), "seconds": "1"}
            )
        )
        eventually(lambda: _dispatched(ws, "g"), 60, what="g dispatched to its pool")
        eventually(
            lambda: "handed back: no live worker consumed" in str(job(ws, "g")["error"]),
            ws.worker_lost_after_s + 30,
            what="the dispatch handed back",
        )
        eventually(lambda: job(ws, "g")["attempt"] >= 2, 60, what="g offered again")
        assert not out.exists()  # nothing ran it: no worker carries the label
        gpu = add_worker(ws, tmp_path, "gpu", labels="gpu")
        try:
            gpu_id = worker_id(ws, gpu)
            eventually(lambda: job(ws, "g").get("state") == "succeeded", 90, what="g ran")
            final = int(job(ws, "g")["attempt"])  # type: ignore[call-overload]
            eventually(
                lambda: db(ws, "SELECT count(*) FROM job_holds WHERE job_id = 'g'")[0][0] == 0,
                30,
                what="every attempt's holds given back",
            )
        finally:
            gpu.stop()
    assert job(ws, "g")["worker"] == gpu_id and final >= 2
    runs = [int(line.split()[0]) for line in out.read_text().splitlines()]
    # the current attempt ran once; an old dispatch started before its cancel came is fenced
    assert runs.count(final) == 1 and all(a <= final for a in runs), runs
    assert len(runs) == len(set(runs)), runs


def _dispatched(s: Settings, job_id: str) -> bool:
    return job(s, job_id).get("state") == "dispatched"
