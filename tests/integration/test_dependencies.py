"""Dependent jobs on real Kafka and PostgreSQL: FOSSology-shaped workflows, failure
propagation, a restart of the dependency agent mid-workflow, rejections and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from agents.settings import Settings
from streams.events import JobSpec
from streams.kafka import headers_dict
from streams.publisher import JobPublisher
from tests.conftest import settings_env
from tests.helpers import Proc, cli, eventually, read_topic, running

pytestmark = pytest.mark.integration
SCANNERS = ["nomos", "monk", "ojo", "copyright", "keyword", "pkgagent"]


def upload(n: int, *, failing_unpack: bool = False, seconds: str = "0") -> list[JobSpec]:
    def job(name: str, deps: list[str], **kw: object) -> JobSpec:
        kind = "fail" if failing_unpack and name == "unpack" else "sleep"
        return JobSpec(
            id=f"u{n}-{name}",
            tenant=f"t{n % 3}",
            kind=kind,
            args={"seconds": seconds},
            depends_on=[f"u{n}-{d}" for d in deps],
            **kw,
        )  # type: ignore[arg-type]

    return [
        job("unpack", []),
        job("adj2nest", ["unpack"]),
        *(job(s, ["adj2nest"]) for s in SCANNERS),
        job("report", SCANNERS),
    ]


def rows(dsn: str) -> dict[str, dict[str, object]]:
    with psycopg.connect(dsn, row_factory=psycopg.rows.dict_row) as conn:
        return {
            r["id"]: r
            for r in conn.execute(
                "SELECT id, state, started_at, finished_at, root_cause, error, attempt, depends_on "
                "FROM jobs"
            ).fetchall()
        }


def terminal_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')"
        ).fetchone() or (0,)
    return int(n)


def assert_dependency_order(jobs: dict[str, dict[str, object]]) -> None:
    for r in jobs.values():
        if r["started_at"] is None:
            continue
        for dep in r["depends_on"]:  # type: ignore[attr-defined]
            assert jobs[dep]["state"] == "succeeded"
            assert r["started_at"] >= jobs[dep]["finished_at"], (r["id"], dep)  # type: ignore[operator]


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return settings_env(settings)


def test_fifty_uploads_complete_in_dependency_order_and_a_failure_stays_in_its_upload(
    settings: Settings, env: dict[str, str], publisher: JobPublisher, tmp_path: Path
) -> None:
    with running(env, tmp_path, slots=8):
        for n in range(50):
            publisher.submit_workflow(f"upload-{n}", upload(n, failing_unpack=n == 7))
        dsn = settings.require_database()
        eventually(lambda: terminal_count(dsn) == 450, 240, interval=0.5, what="450 terminal")
        jobs = rows(dsn)
        assert_dependency_order(jobs)
        failed = {j for j, r in jobs.items() if r["state"] == "failed"}
        assert failed == {f"u7-{x}" for x in ["unpack", "adj2nest", *SCANNERS, "report"]}
        assert jobs["u7-unpack"]["root_cause"] is None
        for x in ["adj2nest", *SCANNERS, "report"]:
            assert jobs[f"u7-{x}"]["root_cause"] == "u7-unpack"
            assert jobs[f"u7-{x}"]["started_at"] is None
        assert sum(r["state"] == "succeeded" for r in jobs.values()) == 441


def test_restarting_the_dependency_agent_mid_workflow_loses_and_duplicates_nothing(
    settings: Settings, env: dict[str, str], publisher: JobPublisher, tmp_path: Path
) -> None:
    worker = Proc(["worker", "--slots", "8"], env, tmp_path / "worker.log")
    sched = Proc(["scheduler"], env, tmp_path / "scheduler-1.log")
    try:
        for n in range(20):
            publisher.submit_workflow(f"upload-{n}", upload(n, seconds="0.05"))
        dsn = settings.require_database()
        eventually(lambda: terminal_count(dsn) >= 30, 120, what="some progress")
        sched.kill()
        assert terminal_count(dsn) < 180, "the kill came too late to prove anything"
        sched = Proc(["scheduler"], env, tmp_path / "scheduler-2.log")
        eventually(lambda: terminal_count(dsn) == 180, 240, interval=0.5, what="180 terminal")
        jobs = rows(dsn)
        assert all(r["state"] == "succeeded" and r["attempt"] == 1 for r in jobs.values())
        assert_dependency_order(jobs)
        with psycopg.connect(dsn) as conn:
            twice = conn.execute(
                "SELECT job_id, event, count(*) FROM job_history WHERE event IN "
                "('unlocked', 'succeeded', 'started') GROUP BY 1, 2 HAVING count(*) > 1"
            ).fetchall()
        assert twice == [], "nothing unlocked, started or finished twice"
    finally:
        sched.stop()
        worker.stop()


def test_cli_workflow_why_missing_dependency_cycle_and_all_done(
    settings: Settings, env: dict[str, str], publisher: JobPublisher, tmp_path: Path
) -> None:
    with running(env, tmp_path, slots=4):
        wf = tmp_path / "wf.yaml"
        wf.write_text(
            "id: wf-1\ntenant: acme\njobs:\n"
            "  - {id: a, kind: fail}\n"
            "  - {id: b, kind: sleep, args: {seconds: '0'}, depends_on: [a]}\n"
            "  - {id: cleanup, kind: sleep, args: {seconds: '0'}, depends_on: [a, b],"
            " trigger: all_done}\n"
        )
        r = cli("submit", "--workflow", str(wf), "--json", env=env)
        assert r.returncode == 0, r.stderr
        bad = tmp_path / "cycle.yaml"
        bad.write_text(
            "id: wf-2\njobs:\n  - {id: x, kind: noop, depends_on: [y]}\n"
            "  - {id: y, kind: noop, depends_on: [x]}\n"
        )
        r = cli("submit", "--workflow", str(bad), env=env)
        assert r.returncode == 1 and "dependency cycle" in r.stderr
        # a workflow naming a job that is neither in it nor submitted: a typo, refused by the
        # CLI, and rejected by the scheduler at once (not after 24 h) when published anyway
        typo = tmp_path / "typo.yaml"
        typo.write_text(
            "id: wf-3\ntenant: acme\njobs:\n  - {id: t-x, kind: noop, depends_on: [a, t-tpyo]}\n"
            "  - {id: t-y, kind: noop, depends_on: [t-x]}\n"
        )
        r = cli("submit", "--workflow", str(typo), env=env)
        assert r.returncode == 2 and "t-tpyo is neither a job of the workflow" in r.stderr
        publisher.submit_workflow(
            "wf-3",
            [
                JobSpec(id="t-x", tenant="acme", kind="noop", depends_on=["a", "t-tpyo"]),
                JobSpec(id="t-y", tenant="acme", kind="noop", depends_on=["t-x"]),
            ],
        )
        # a job without the argument its kind's command names: refused, not run and failed
        r = cli("submit", "echo", "--id", "no-message", env=env)
        assert r.returncode == 2 and "needs the argument(s) message" in r.stderr
        # a dependency that is not submitted (yet): surfaced by `why`
        publisher.submit(JobSpec(id="lonely", tenant="acme", kind="noop", depends_on=["ghost"]))
        # a cycle closed across submissions: the closing job is rejected
        publisher.submit(JobSpec(id="p", tenant="acme", kind="noop", depends_on=["q"]))
        publisher.submit(JobSpec(id="q", tenant="acme", kind="noop", depends_on=["p"]))
        dsn = settings.require_database()
        eventually(
            lambda: (
                {
                    k: v["state"]
                    for k, v in rows(dsn).items()
                    if k in ("a", "b", "cleanup", "p", "q", "t-x", "t-y")
                }
                == {
                    "a": "failed",
                    "b": "failed",
                    "cleanup": "succeeded",
                    "p": "failed",
                    "q": "failed",
                    "t-x": "failed",
                    "t-y": "failed",
                }
            ),
            120,
            what="workflow settled",
        )
        r = cli("why", "lonely", "--json", env=env)
        why = json.loads(r.stdout)
        assert why["state"] == "waiting" and "not yet submitted: ghost" in why["gate"]
        assert why["dependencies"] == [
            {"id": "ghost", "needs": "success", "edge": "depends_on", "state": "not submitted"}
        ]
        r = cli("workflow", "show", "wf-1", env=env)
        assert r.returncode == 0 and "cleanup" in r.stdout and "succeeded" in r.stdout
        shown = json.loads(cli("workflow", "show", "wf-1", "--json", env=env).stdout)
        assert [j["id"] for j in shown] == ["a", "b", "cleanup"]
        letters = [
            headers_dict(m.headers())
            for m in read_topic(
                settings.require_kafka(), settings.topic_prefix + "jobs.deadletter", expect=2
            )
        ]
        assert any("dependency cycle" in h["dlq.reason"] for h in letters)
        assert any("t-tpyo is neither a job of its workflow" in h["dlq.reason"] for h in letters)


def test_order_key_runs_jobs_one_after_another(
    settings: Settings, env: dict[str, str], publisher: JobPublisher, tmp_path: Path
) -> None:
    with running(env, tmp_path, slots=4):
        ids = [f"o{i}" for i in range(5)]
        for i in ids:
            publisher.submit(
                JobSpec(
                    id=i,
                    tenant="acme",
                    kind="sleep",
                    args={"seconds": "0.2"},
                    order_key="db-migrations",
                )
            )
        dsn = settings.require_database()
        eventually(lambda: terminal_count(dsn) == 5, 120, what="5 terminal")
        jobs = rows(dsn)
        for prev, nxt in zip(ids, ids[1:], strict=False):
            assert jobs[nxt]["started_at"] >= jobs[prev]["finished_at"]  # type: ignore[operator]
