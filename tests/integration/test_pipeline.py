"""The walking skeleton on real services: Kafka (KRaft) → faust agents → worker subprocess →
PostgreSQL, with the scheduler and the worker running as separate processes."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psycopg
import pytest

from agents.settings import Settings
from streams.events import JobFailed, JobSpec, JobStarted, JobSucceeded, decode
from streams.kafka import headers_dict
from streams.publisher import JobPublisher
from tests.conftest import settings_env
from tests.helpers import Proc, eventually, read_topic, running

pytestmark = pytest.mark.integration


def states(dsn: str, ids: list[str]) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id, state FROM jobs WHERE id = ANY(%s)", (ids,)).fetchall()
    return {r[0]: r[1] for r in rows}


def row(dsn: str, job_id: str) -> dict[str, object]:
    with psycopg.connect(dsn, row_factory=psycopg.rows.dict_row) as conn:
        r = conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert r is not None, f"no row for {job_id}"
    return r


@pytest.fixture
def services(settings: Settings, tmp_path: Path) -> Iterator[dict[str, Proc]]:
    with running(settings_env(settings), tmp_path) as procs:
        yield procs


def test_job_runs_as_subprocess_and_reaches_succeeded(
    settings: Settings, services: dict[str, Proc], publisher: JobPublisher, tmp_path: Path
) -> None:
    marker = tmp_path / "ran.txt"
    publisher.submit(JobSpec(id="touch-1", tenant="acme", kind="touch", args={"path": str(marker)}))
    dsn = settings.require_database()
    eventually(
        lambda: states(dsn, ["touch-1"]).get("touch-1") == "succeeded", 90, what="touch-1 succeeded"
    )
    assert marker.exists(), "the job's subprocess did not run"
    r = row(dsn, "touch-1")
    assert r["attempt"] == 1 and r["exit_code"] == 0
    assert r["started_at"] is not None and r["finished_at"] >= r["started_at"]
    assert Path(str(r["log_path"])).exists()
    events = [
        decode(m.value())
        for m in read_topic(
            settings.require_kafka(), settings.topic_prefix + "jobs.events", expect=2
        )
    ]
    mine = [e for e in events if e.job_id == "touch-1"]
    assert [type(e) for e in mine] == [JobStarted, JobSucceeded]
    assert all(e.attempt == 1 for e in mine)


def test_hostile_arguments_stay_single_argv_items(
    settings: Settings, services: dict[str, Proc], publisher: JobPublisher, tmp_path: Path
) -> None:
    out = tmp_path / "argv.json"
    hostile = '\'; rm -rf / #$(touch /tmp/pwned) `id` "quoted" {0.__class__} ünïcode\n'
    publisher.submit(
        JobSpec(id="argv-1", tenant="acme", kind="argv", args={"out": str(out), "value": hostile})
    )
    eventually(
        lambda: states(settings.require_database(), ["argv-1"]).get("argv-1") == "succeeded",
        90,
        what="argv-1 succeeded",
    )
    assert json.loads(out.read_text()) == [hostile]


def test_bad_input_is_dead_lettered_and_valid_jobs_around_it_finish(
    settings: Settings, services: dict[str, Proc], publisher: JobPublisher
) -> None:
    good = [
        JobSpec(id=f"good-{i}", tenant="acme", kind="sleep", args={"seconds": "0"})
        for i in range(4)
    ]
    bad = {
        b"{this is not json": "malformed JSON",
        b'{"type":"job.submitted","v":1,"job":{"id":"wrong-type","tenant":"acme",'
        b'"kind":"sleep","priority":"urgent"},"submitted_at":1}': "Expected `int`",
        b'{"type":"job.submitted","v":1,"job":{"id":"unknown-kind","tenant":"acme",'
        b'"kind":"rocket"},"submitted_at":1}': "unknown kind 'rocket'",
        b'{"type":"job.submitted","v":1,"job":{"id":"big","tenant":"acme","kind":"sleep",'
        b'"args":{"blob":"' + b"x" * 20_000 + b'"}},"submitted_at":1}': "over the limit",
        b'{"type":"job.submitted","v":1,"extra":true,"job":{"id":"extra","tenant":"a",'
        b'"kind":"sleep"},"submitted_at":1}': "unknown field",
        b'{"type":"job.submitted","v":1,"job":{"id":"no-arg","tenant":"acme",'
        b'"kind":"sleep"},"submitted_at":1}': "kind 'sleep' needs the argument(s) seconds",
    }
    publisher.submit(good[0])
    publisher.submit(good[1])
    for raw in bad:
        publisher.send_raw("jobs.independent", raw, b"k")
    publisher.submit(good[2])
    publisher.submit(good[3])
    dsn = settings.require_database()
    ids = [g.id for g in good]
    eventually(
        lambda: list(states(dsn, ids).values()).count("succeeded") == 4,
        90,
        what="valid jobs succeeded",
    )
    letters = list(
        read_topic(
            settings.require_kafka(), settings.topic_prefix + "jobs.deadletter", expect=len(bad)
        )
    )
    assert len(letters) == len(bad)
    by_value = {m.value(): headers_dict(m.headers()) for m in letters}
    for raw, reason in bad.items():
        assert raw in by_value, "the original bytes must be kept"
        h = by_value[raw]
        assert reason in h["dlq.reason"], h["dlq.reason"]
        assert h["dlq.topic"] == settings.topic_prefix + "jobs.independent"
        assert int(h["dlq.offset"]) >= 0
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (len(bad),)


def test_failure_is_retried_then_fails_its_dependents(
    settings: Settings, services: dict[str, Proc], publisher: JobPublisher
) -> None:
    publisher.submit(JobSpec(id="root", tenant="acme", kind="fail", group="g1"))
    publisher.submit(
        JobSpec(
            id="child",
            tenant="acme",
            kind="sleep",
            args={"seconds": "0"},
            group="g1",
            depends_on=["root"],
        )
    )
    publisher.submit(
        JobSpec(
            id="grandchild",
            tenant="acme",
            kind="sleep",
            args={"seconds": "0"},
            group="g1",
            depends_on=["child"],
        )
    )
    dsn = settings.require_database()
    eventually(
        lambda: set(states(dsn, ["root", "child", "grandchild"]).values()) == {"failed"},
        90,
        what="all three failed",
    )
    root = row(dsn, "root")
    assert root["attempt"] == 2, "kind 'fail' allows two attempts"
    assert "exit code 3" in str(root["error"]) and "failing on purpose" in str(root["error"])
    assert row(dsn, "child")["error"] == "dependency root failed"
    assert row(dsn, "grandchild")["error"] == "dependency child failed because root did not succeed"
    assert row(dsn, "grandchild")["root_cause"] == "root"
    assert row(dsn, "child")["started_at"] is None
    events = [
        decode(m.value())
        for m in read_topic(
            settings.require_kafka(), settings.topic_prefix + "jobs.events", expect=4
        )
    ]
    fails = [e for e in events if isinstance(e, JobFailed) and e.job_id == "root"]
    assert [e.attempt for e in fails] == [1, 2]


def test_dependent_runs_only_after_its_dependencies(
    settings: Settings, services: dict[str, Proc], publisher: JobPublisher
) -> None:
    # submitted child first: arrival order must not matter
    publisher.submit(
        JobSpec(
            id="report",
            tenant="acme",
            kind="sleep",
            args={"seconds": "0"},
            group="up-1",
            depends_on=["nomos", "monk"],
        )
    )
    publisher.submit(
        JobSpec(id="nomos", tenant="acme", kind="sleep", args={"seconds": "0.3"}, group="up-1")
    )
    publisher.submit(
        JobSpec(id="monk", tenant="acme", kind="sleep", args={"seconds": "0.1"}, group="up-1")
    )
    dsn = settings.require_database()
    eventually(
        lambda: set(states(dsn, ["report", "nomos", "monk"]).values()) == {"succeeded"},
        90,
        what="workflow succeeded",
    )
    report = row(dsn, "report")
    for dep in ("nomos", "monk"):
        assert report["started_at"] >= row(dsn, dep)["finished_at"]  # type: ignore[operator]
    # the scheduler owns every tenant here: the job its completions released went straight
    # to admission in the same process, never through jobs.ready
    on_ready = [
        decode(m.value()).job_id
        for m in read_topic(
            settings.require_kafka(), settings.topic_prefix + "jobs.ready", expect=10**6, timeout=4
        )
    ]
    assert "report" not in on_ready


def test_killing_the_scheduler_mid_run_loses_no_job(
    settings: Settings, tmp_path: Path, publisher: JobPublisher
) -> None:
    env = settings_env(settings)
    worker = Proc(["worker", "--slots", "8"], env, tmp_path / "worker.log")
    sched = Proc(["scheduler"], env, tmp_path / "scheduler-1.log")
    n = 300
    ids = [f"k-{i}" for i in range(n)]
    try:
        publisher.submit_many(
            JobSpec(id=i, tenant=f"t{j % 3}", kind="sleep", args={"seconds": "0.02"})
            for j, i in enumerate(ids)
        )
        dsn = settings.require_database()
        eventually(
            lambda: list(states(dsn, ids).values()).count("succeeded") >= 20,
            120,
            what="first jobs done",
        )
        sched.kill()  # SIGKILL: no shutdown, no commit
        done_at_kill = list(states(dsn, ids).values()).count("succeeded")
        assert done_at_kill < n, "the kill came too late to prove anything"
        time.sleep(1)
        sched = Proc(["scheduler"], env, tmp_path / "scheduler-2.log")
        final = eventually(
            lambda: (
                (s := states(dsn, ids))
                and sum(v in ("succeeded", "failed", "cancelled") for v in s.values()) == n
                and s
            ),
            180,
            what="every accepted job terminal",
        )
        assert len(final) == n, "every submitted job was accepted"
        assert list(final.values()).count("succeeded") == n
    finally:
        sched.stop()
        worker.stop()


def test_worker_drains_on_sigterm(
    settings: Settings, tmp_path: Path, publisher: JobPublisher
) -> None:
    env = settings_env(settings)
    sched = Proc(["scheduler"], env, tmp_path / "scheduler.log")
    worker = Proc(["worker", "--slots", "2"], env, tmp_path / "worker.log")
    try:
        publisher.submit(JobSpec(id="long", tenant="acme", kind="sleep", args={"seconds": "3"}))
        dsn = settings.require_database()
        eventually(lambda: states(dsn, ["long"]).get("long") == "running", 90, what="running")
        worker.signal(signal.SIGTERM)
        assert worker.p.wait(60) == 0, worker.output()
        assert states(dsn, ["long"])["long"] == "succeeded", "drain lets the running job finish"
        with psycopg.connect(dsn) as conn:
            (state,) = conn.execute("SELECT state FROM workers").fetchone() or (None,)
        assert state == "stopped"
    finally:
        worker.stop()
        sched.stop()


def test_replayed_events_change_nothing(
    settings: Settings, services: dict[str, Proc], publisher: JobPublisher, tmp_path: Path
) -> None:
    marker = tmp_path / "once.txt"
    spec = JobSpec(id="once", tenant="acme", kind="touch", args={"path": str(marker)})
    publisher.submit(spec)
    dsn = settings.require_database()
    eventually(lambda: states(dsn, ["once"]).get("once") == "succeeded", 90, what="succeeded")
    before = row(dsn, "once")
    # the same submission again, and the worker's events again: all no-ops
    publisher.submit(spec)
    for m in read_topic(settings.require_kafka(), settings.topic_prefix + "jobs.events", expect=2):
        publisher.send_raw("jobs.events", m.value(), m.key())
    stale = JobFailed(job_id="once", attempt=1, worker="ghost", at=time.time(), error="late")
    publisher.send_raw("jobs.events", msgspec.json.encode(stale), b"once")
    publisher.submit(JobSpec(id="after", tenant="acme", kind="sleep", args={"seconds": "0"}))
    eventually(lambda: states(dsn, ["after"]).get("after") == "succeeded", 90, what="after")
    time.sleep(1)
    after = row(dsn, "once")
    for key in ("state", "attempt", "started_at", "finished_at", "worker", "error"):
        assert after[key] == before[key], key


def test_a_short_jobs_start_and_outcome_share_one_transaction(
    settings: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    """The dependency agent holds a batch of starts alone (``start_hold_s``) for more events:
    a job that ends within the hold has its start and its outcome applied by one transaction
    (their history rows carry that transaction's time), and both are still recorded."""
    held = msgspec.structs.replace(settings, start_hold_s=1.0)
    marker = tmp_path / "quick.txt"
    with running(settings_env(held), tmp_path):
        publisher.submit(
            JobSpec(id="quick", tenant="acme", kind="touch", args={"path": str(marker)})
        )
        dsn = settings.require_database()
        eventually(lambda: states(dsn, ["quick"]).get("quick") == "succeeded", 90, what="quick")
    with psycopg.connect(dsn) as conn:
        history = dict(
            conn.execute(
                "SELECT event, at FROM job_history WHERE job_id = 'quick' "
                "AND event IN ('started', 'succeeded')"
            ).fetchall()
        )
    assert set(history) == {"started", "succeeded"}
    assert history["started"] == history["succeeded"]
    r = row(dsn, "quick")
    assert r["started_at"] is not None and r["finished_at"] >= r["started_at"]  # type: ignore[operator]
