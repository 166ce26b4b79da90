"""Workers on real Kafka and PostgreSQL, as separate processes: kill -9 mid-job (retried on
another worker, succeeds once), a frozen worker that comes back (fenced), a hung job killed
at its timeout, cancel of a running subprocess with dependents per trigger rule, pause and
resume (SIGSTOP/SIGCONT), retry, SIGTERM drain, three workers sharing load, label pools and
Python entry points."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from agents.settings import Settings, load_settings
from streams.events import Control, JobSpec, encode
from streams.publisher import JobPublisher
from tests.conftest import KINDS, settings_env
from tests.helpers import Proc, cli, eventually

pytestmark = pytest.mark.timeout(240)

# a job that records each attempt (attempt number, worker pid) and then sleeps
MARK = [
    "sh",
    "-c",
    'echo "$JOBSTREAM_ATTEMPT $PPID" >> "$1"; echo $$ > "$1.pid"; exec sleep "$2"',
    "sh",
    "{out}",
    "{seconds}",
]
WORKER_KINDS = {
    **KINDS,
    "mark": {"command": MARK, "timeout_s": 60, "max_attempts": 3, "retry_backoff_s": 0.2},
    "hang": {"command": ["sleep", "60"], "timeout_s": 1.5, "max_attempts": 1},
    "count": {
        "command": [
            "sh",
            "-c",
            'i=0; while [ $i -lt "$2" ]; do i=$((i+1)); echo $i >> "$1"; sleep 0.1; done',
            "sh",
            "{out}",
            "{n}",
        ],
        "timeout_s": 30,
        "max_attempts": 1,
    },
    "needs-file": {"command": ["test", "-e", "{path}"], "timeout_s": 10, "max_attempts": 1},
    "pinned": {"command": ["touch", "{path}"], "labels": ["gpu"], "max_attempts": 1},
    "pinned-mark": {"command": MARK, "labels": ["gpu"], "max_attempts": 1, "retry_backoff_s": 0.5},
    "py": {"entrypoint": "tests.jobfns:record", "timeout_s": 30, "max_attempts": 1},
    "py-bad": {"entrypoint": "tests.jobfns:explode", "timeout_s": 30, "max_attempts": 2},
    "py-hang": {"entrypoint": "tests.jobfns:hang", "timeout_s": 1.5, "max_attempts": 1},
    "py-long": {"entrypoint": "tests.jobfns:hang", "timeout_s": 120, "max_attempts": 1},
    "py-count": {"entrypoint": "tests.jobfns:count", "timeout_s": 60, "max_attempts": 1},
}


@pytest.fixture
def ws(settings: Settings) -> Settings:
    return worker_settings(settings)


def worker_settings(settings: Settings) -> Settings:
    """The test's settings with the workers' kinds and short liveness timers."""
    return load_settings(
        settings_env(
            settings.replace(
                kinds=WORKER_KINDS,  # type: ignore[arg-type]
                worker_lost_after_s=6.0,
                heartbeat_interval_s=1.0,
                drain_grace_s=20.0,
                kill_grace_s=1.0,
            )
        )
    )


def db(s: Settings, query: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(s.require_database()) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


def job(s: Settings, job_id: str) -> dict[str, object]:
    rows = db(s, "SELECT state, attempt, worker, error, progress FROM jobs WHERE id = %s", job_id)
    if not rows:
        return {}
    state, attempt, worker, error, progress = rows[0]
    return {"state": state, "attempt": attempt, "worker": worker, "error": error, "p": progress}


def count_in(s: Settings, ids: list[str], state: str) -> int:
    """How many of these jobs are in ``state``."""
    rows = db(s, "SELECT count(*) FROM jobs WHERE id = ANY(%s) AND state = %s", ids, state)
    return int(rows[0][0])  # type: ignore[call-overload]


def worker_id(s: Settings, proc: Proc) -> str:
    def find() -> str | None:
        rows = db(s, "SELECT id FROM workers WHERE pid = %s AND state = 'running'", proc.p.pid)
        return str(rows[0][0]) if rows else None

    return eventually(find, 60, what=f"worker pid {proc.p.pid} heartbeating")


@contextmanager
def cluster(
    s: Settings, logs: Path, workers: int = 1, slots: int = 2, labels: str | None = None
) -> Iterator[tuple[Proc, list[Proc]]]:
    env = settings_env(s)
    sched = Proc(["scheduler"], env, logs / "scheduler.log")
    procs = [add_worker(s, logs, f"worker-{i}", slots, labels) for i in range(workers)]
    try:
        yield sched, procs
    finally:
        for p in [*procs, sched]:
            p.stop(timeout=30)


def add_worker(
    s: Settings, logs: Path, name: str, slots: int = 2, labels: str | None = None
) -> Proc:
    args = ["worker", "--slots", str(slots), *(["--labels", labels] if labels else [])]
    return Proc(args, settings_env(s), logs / f"{name}.log")


def attempts_file(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_kill_9_mid_job_retries_on_another_worker_and_succeeds_once(
    ws: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    out = tmp_path / "mark.txt"
    with cluster(ws, tmp_path, workers=1) as (_, (first,)):
        first_id = worker_id(ws, first)
        publisher.submit(
            JobSpec(id="k9", tenant="acme", kind="mark", args={"out": str(out), "seconds": "4"})
        )
        eventually(lambda: job(ws, "k9").get("state") == "running", 60, what="k9 running")
        second = add_worker(ws, tmp_path, "worker-2")
        try:
            second_id = worker_id(ws, second)
            first.kill()  # kill -9 mid-job
            lost_at = time.monotonic()
            eventually(lambda: job(ws, "k9").get("state") == "succeeded", 90, what="k9 done")
            recovered_s = time.monotonic() - lost_at
        finally:
            second.stop()
    j = job(ws, "k9")
    assert j["worker"] == second_id and j["attempt"] == 2
    history = db(ws, "SELECT event, detail FROM job_history WHERE job_id = 'k9' ORDER BY id")
    events = [e for e, _ in history]
    assert events.count("succeeded") == 1
    lost = [d for e, d in history if e == "ready"]
    assert lost and f"worker {first_id} lost" in json.dumps(lost)
    assert [line for line in attempts_file(out)[::2]] == ["1", "2"]
    state = db(ws, "SELECT state FROM workers WHERE id = %s", first_id)[0][0]
    assert state == "lost"
    # slots: lost after 6 s of silence, then a retry and a 4 s run; far from unbounded
    assert recovered_s < 60


def test_a_frozen_worker_that_comes_back_cannot_complete_the_retried_job(
    ws: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    """Fencing, not terminal absorption: the frozen worker comes back and reports attempt 1
    (whose process ended meanwhile) while attempt 2 still runs; the job stays with attempt
    2 and ends with its outcome."""
    out = tmp_path / "mark.txt"
    with cluster(ws, tmp_path, workers=1) as (_, (first,)):
        publisher.submit(
            JobSpec(id="zz", tenant="acme", kind="mark", args={"out": str(out), "seconds": "9"})
        )
        eventually(lambda: job(ws, "zz").get("state") == "running", 60, what="zz running")
        second = add_worker(ws, tmp_path, "worker-2")
        try:
            second_id = worker_id(ws, second)
            first.signal(signal.SIGSTOP)  # frozen: no heartbeats (its job's process runs on)
            eventually(
                lambda: job(ws, "zz").get("attempt") == 2 and job(ws, "zz")["state"] == "running",
                60,
                what="attempt 2 running",
            )
            first.signal(signal.SIGCONT)  # comes back and reports attempt 1
            eventually(
                lambda: (
                    db(ws, "SELECT state FROM workers WHERE pid = %s", first.p.pid)[0][0]
                    == "running"
                ),
                30,
                what="first worker heartbeating again",
            )
            eventually(
                lambda: (
                    db(
                        ws,
                        "SELECT count(*) FROM job_history WHERE job_id = 'zz' AND attempt = 1 "
                        "AND event = 'started'",
                    )[0][0]
                    and len(attempts_file(out)) >= 4
                ),
                30,
                what="both attempts ran",
            )
            time.sleep(1.5)  # attempt 1's report reaches the dependency stage
            during = job(ws, "zz")
            assert during["state"] == "running" and during["attempt"] == 2, during
            eventually(lambda: job(ws, "zz").get("state") == "succeeded", 60, what="zz done")
        finally:
            second.stop()
    j = job(ws, "zz")
    assert j["state"] == "succeeded" and j["worker"] == second_id and j["attempt"] == 2
    events = [e for (e,) in db(ws, "SELECT event FROM job_history WHERE job_id = 'zz'")]
    assert events.count("succeeded") == 1


def test_a_hung_job_is_killed_at_its_timeout(
    ws: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    with cluster(ws, tmp_path):
        publisher.submit(JobSpec(id="hung", tenant="acme", kind="hang"))
        eventually(lambda: job(ws, "hung").get("state") == "failed", 60, what="hung failed")
    assert "timed out after 1.5 s" in str(job(ws, "hung")["error"])


def test_cancel_stops_the_process_and_dependents_follow_their_trigger_rule(
    ws: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    out = tmp_path / "a.txt"
    done = tmp_path / "cleanup-ran"
    env = settings_env(ws)
    with cluster(ws, tmp_path):
        publisher.submit_workflow(
            "wf",
            [
                JobSpec(
                    id="a", tenant="acme", kind="mark", args={"out": str(out), "seconds": "60"}
                ),
                JobSpec(
                    id="b",
                    tenant="acme",
                    kind="touch",
                    args={"path": str(tmp_path / "b")},
                    depends_on=["a"],
                ),
                JobSpec(
                    id="c",
                    tenant="acme",
                    kind="touch",
                    args={"path": str(done)},
                    depends_on=["a"],
                    trigger="all_done",
                ),
            ],
        )
        eventually(lambda: job(ws, "a").get("state") == "running", 60, what="a running")
        pid = int(
            eventually(
                lambda: (
                    Path(f"{out}.pid").read_text().strip() if Path(f"{out}.pid").exists() else ""
                ),
                30,
            )
        )
        r = cli("cancel", "a", "--reason", "not needed", env=env)
        assert r.returncode == 0, r.stderr
        eventually(lambda: job(ws, "a").get("state") == "cancelled", 30, what="a cancelled")
        eventually(lambda: not _alive(pid), 30, what="the job's process gone")
        eventually(lambda: job(ws, "c").get("state") == "succeeded", 60, what="all_done ran")
        eventually(lambda: job(ws, "b").get("state") == "failed", 30, what="b failed")
        bad = cli("cancel", "no-such-job", env=env)
        assert bad.returncode == 1 and "no job 'no-such-job'" in bad.stderr  # refused, not sent
        # sent by another publisher anyway: the control agent dead-letters it with a reason
        cmd = Control(action="cancel", scope="job", name="no-such-job", by="test", at=time.time())
        publisher.send_raw("jobs.control", encode(cmd), b"no-such-job")
        eventually(
            lambda: db(ws, "SELECT count(*) FROM dead_letters WHERE reason LIKE %s", "%no job%")[0][
                0
            ],
            30,
            what="unknown job dead-lettered",
        )

    assert done.exists() and not (tmp_path / "b").exists()
    assert "not needed" in str(job(ws, "a")["error"])
    root = db(ws, "SELECT root_cause FROM jobs WHERE id = 'b'")[0][0]
    assert root == "a"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not reaped) counts as gone
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False


def _paused_in_place(env: dict[str, str], job_id: str, out: Path) -> int:
    """Once the counting job writes, pause it; the count it stopped at."""
    eventually(lambda: len(attempts_file(out)) >= 3, 60, what="counting")
    assert cli("pause", "--job", job_id, env=env).returncode == 0
    time.sleep(1.5)  # the command reaches the worker; the process stops
    return len(attempts_file(out))


def test_pause_stops_a_running_job_in_place_and_resume_continues_it(
    ws: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    out = tmp_path / "count.txt"
    env = settings_env(ws)
    with cluster(ws, tmp_path):
        publisher.submit(
            JobSpec(id="p", tenant="acme", kind="count", args={"out": str(out), "n": 40})
        )
        frozen = _paused_in_place(env, "p", out)
        time.sleep(1.5)
        assert len(attempts_file(out)) == frozen < 40
        assert job(ws, "p")["state"] == "running"
        assert cli("resume", "--job", "p", env=env).returncode == 0
        eventually(lambda: job(ws, "p").get("state") == "succeeded", 60, what="p done")
    assert len(attempts_file(out)) == 40


def test_a_pooled_python_job_times_out_is_cancelled_and_pauses_in_place(
    ws: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    """The worker's hot path runs Python jobs in warm pool members without a task per job:
    its one ticker stops a job at its time limit, a cancel stops the member, a pause
    stops the member's process group and paused time does not count; the pool then runs
    jobs on fresh members."""
    out = tmp_path / "count.txt"
    env = settings_env(ws)
    with cluster(ws, tmp_path, slots=3):
        publisher.submit(JobSpec(id="ph", tenant="acme", kind="py-hang", args={"seconds": 60}))
        publisher.submit(JobSpec(id="pl", tenant="acme", kind="py-long", args={"seconds": 60}))
        count = {"out": str(out), "n": 40, "every_s": 0.2}
        publisher.submit(JobSpec(id="pc", tenant="acme", kind="py-count", args=count))
        frozen = _paused_in_place(env, "pc", out)
        eventually(lambda: job(ws, "ph").get("state") == "failed", 60, what="ph timed out")
        eventually(lambda: job(ws, "pl").get("state") == "running", 60, what="pl running")
        assert cli("cancel", "pl", "--reason", "not needed", env=env).returncode == 0
        eventually(lambda: job(ws, "pl").get("state") == "cancelled", 30, what="pl cancelled")
        assert len(attempts_file(out)) == frozen < 40
        assert job(ws, "pc")["state"] == "running"
        assert cli("resume", "--job", "pc", env=env).returncode == 0
        eventually(lambda: job(ws, "pc").get("state") == "succeeded", 60, what="pc done")
        publisher.submit(
            JobSpec(
                id="after",
                tenant="acme",
                kind="py",
                args={"out": str(tmp_path / "after.json"), "value": 1},
            )
        )
        eventually(lambda: job(ws, "after").get("state") == "succeeded", 60, what="after ran")
    assert "timed out after 1.5 s" in str(job(ws, "ph")["error"])
    assert "not needed" in str(job(ws, "pl")["error"])
    assert attempts_file(out) == [str(i) for i in range(1, 41)]


def test_retry_gives_a_failed_job_another_attempt(
    ws: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    flag = tmp_path / "flag"
    env = settings_env(ws)
    with cluster(ws, tmp_path):
        publisher.submit(
            JobSpec(id="r", tenant="acme", kind="needs-file", args={"path": str(flag)})
        )
        eventually(lambda: job(ws, "r").get("state") == "failed", 60, what="r failed")
        flag.touch()
        assert cli("retry", "r", env=env).returncode == 0
        eventually(lambda: job(ws, "r").get("state") == "succeeded", 60, what="r retried")
    assert job(ws, "r")["attempt"] == 2


def test_sigterm_drains_without_losing_or_duplicating_a_job(
    ws: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    outs = [tmp_path / f"d{i}.txt" for i in range(6)]
    ids = [f"d{i}" for i in range(6)]
    with cluster(ws, tmp_path, workers=1, slots=2) as (_, (first,)):
        worker_id(ws, first)
        publisher.submit_many(
            JobSpec(id=i, tenant="acme", kind="mark", args={"out": str(o), "seconds": "2"})
            for i, o in zip(ids, outs, strict=True)
        )
        eventually(
            lambda: sum(job(ws, i).get("state") == "running" for i in ids) == 2, 60, what="2 run"
        )
        assert first.stop(timeout=30) == 0  # SIGTERM: drains the two running jobs, exits 0
        running_then = [i for i in ids if job(ws, i)["state"] == "succeeded"]
        assert len(running_then) == 2
        second = add_worker(ws, tmp_path, "worker-2")
        try:
            eventually(
                lambda: all(job(ws, i).get("state") == "succeeded" for i in ids), 90, what="all"
            )
        finally:
            second.stop()
    for o in outs:
        assert attempts_file(o)[::2] == ["1"]  # each job ran exactly once, first attempt


def test_three_workers_share_the_load(
    ws: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    ids = [f"s{i}" for i in range(36)]
    with cluster(ws, tmp_path, workers=3, slots=2) as (_, procs):
        wids = [worker_id(ws, p) for p in procs]
        time.sleep(3)  # the group settles: 12 dispatch partitions, 4 each
        publisher.submit_many(
            JobSpec(id=i, tenant="acme", kind="sleep", args={"seconds": "0.3"}) for i in ids
        )
        eventually(lambda: count_in(ws, ids, "succeeded") == len(ids), 120, what="all done")
    per = dict(db(ws, "SELECT worker, count(*) FROM jobs WHERE id = ANY(%s) GROUP BY 1", ids))
    assert set(per) == set(wids), per
    assert all(n >= 3 for n in per.values()), per


def test_labelled_kinds_run_only_on_workers_that_carry_the_labels_and_python_jobs_run(
    ws: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    pinned = tmp_path / "pinned"
    py_out = tmp_path / "py.json"
    env = settings_env(ws)
    with cluster(ws, tmp_path, workers=1) as (_, (plain,)):
        worker_id(ws, plain)
        publisher.submit(JobSpec(id="g", tenant="acme", kind="pinned", args={"path": str(pinned)}))
        publisher.submit(
            JobSpec(id="py", tenant="acme", kind="py", args={"out": str(py_out), "value": 'ü " x'})
        )
        publisher.submit(JobSpec(id="pyb", tenant="acme", kind="py-bad", args={"message": "boom"}))
        publisher.submit(
            JobSpec(
                id="py-slow",
                tenant="acme",
                kind="py",
                args={"out": str(tmp_path / "slow.json"), "value": 1, "steps": 60},
            )
        )
        eventually(lambda: job(ws, "py").get("state") == "succeeded", 60, what="python job")
        midway = eventually(
            lambda: (p := job(ws, "py-slow").get("p")) is not None and 0 < float(p) < 1 and p,
            60,
            what="progress reported while running",
        )
        eventually(lambda: job(ws, "pyb").get("state") == "failed", 60, what="python failure")
        time.sleep(2)
        assert job(ws, "g")["state"] in ("ready", "dispatched") and not pinned.exists()
        why = cli("why", "g", env=env)
        assert "no live worker carries the labels gpu" in why.stdout, why.stdout + why.stderr
        gpu = add_worker(ws, tmp_path, "gpu", labels="gpu")
        try:
            gpu_id = worker_id(ws, gpu)
            eventually(lambda: job(ws, "g").get("state") == "succeeded", 60, what="pinned ran")
        finally:
            gpu.stop()
        listing = cli("workers", "--json", env=env)
    assert job(ws, "g")["worker"] == gpu_id and pinned.exists()
    assert json.loads(py_out.read_text()) == {"value": 'ü " x'}
    assert 0 < float(midway) < 1  # from the job, through the heartbeat, into the store
    # progress files are swept by the heartbeats once their jobs end, and a stopped
    # worker leaves no progress directory behind
    assert not list((Path(ws.log_dir) / ".progress").glob("*/*.progress"))
    assert job(ws, "py")["p"] == pytest.approx(1.0)  # a finished job is complete
    bad = job(ws, "pyb")
    assert bad["attempt"] == 2 and "RuntimeError: boom" in str(bad["error"])
    rows = {r["id"]: r for r in json.loads(listing.stdout)}
    assert "gpu" in rows[gpu_id]["labels"] and rows[gpu_id]["state"] == "stopped"
