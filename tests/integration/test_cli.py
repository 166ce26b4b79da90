"""The CLI as a user runs it (subprocesses) against real services: status, jobs with filters
and paging, submit --wait, dead letter show and replay, --json shapes, and exit codes with
helpful messages on bad input and unreachable services."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.settings import Settings, load_settings
from streams.events import JobSpec
from streams.publisher import JobPublisher
from tests.conftest import settings_env
from tests.helpers import cli, eventually, running

pytestmark = pytest.mark.timeout(240)


def j(out: str) -> object:
    return json.loads(out)


def test_status_jobs_wait_and_deadletter_replay(
    settings: Settings, publisher: JobPublisher, tmp_path: Path
) -> None:
    env = settings_env(settings)
    with running(env, tmp_path, slots=4):
        r = cli("submit", "echo", "--arg", "message=hi", "--id", "w1", "--wait", "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert j(r.stdout) == {"states": {"w1": "succeeded"}, "failed": []}
        shown = cli("job", "w1", env=env)
        assert "last lines" in shown.stdout and "hi" in shown.stdout.split("last lines")[1]
        assert j(cli("job", "w1", "--json", env=env).stdout)["log_tail"] == "hi"  # type: ignore[index]
        r = cli("submit", "fail", "--id", "w2", "--tenant", "beta", "--wait", env=env)
        assert r.returncode == 1 and "failed: w2" in r.stdout
        # a command on one job that cannot do anything is refused before it is sent
        r = cli("retry", "w1", env=env)
        assert r.returncode == 1 and "job 'w1' already succeeded: retry" in r.stderr
        r = cli("priority", "nosuch", "5", env=env)
        assert r.returncode == 1 and "no job 'nosuch'" in r.stderr and "sent" not in r.stdout
        r = cli("cancel", "nosuch", "--json", env=env)
        assert r.returncode == 1 and j(r.stdout) == {"error": "error: no job 'nosuch'", "code": 1}
        r = cli("job", "nosuch", "--json", env=env)
        assert r.returncode == 1 and j(r.stdout) == {"error": "no job 'nosuch'", "code": 1}
        wf = tmp_path / "wf.yaml"
        wf.write_text(
            "id: wf-1\njobs:\n  - {id: wf-1-a, kind: noop}\n"
            "  - {id: wf-1-b, kind: noop, depends_on: [wf-1-a]}\n"
        )
        r = cli("submit", "--workflow", str(wf), "--wait", env=env)
        assert r.returncode == 0 and "2 of 2 succeeded" in r.stdout, r.stdout + r.stderr
        publisher.submit_many(JobSpec(id=f"p{i:02d}", tenant="acme", kind="noop") for i in range(7))
        eventually(
            lambda: (
                len(
                    j(
                        cli(
                            "jobs", "--tenant", "acme", "--state", "succeeded", "--json", env=env
                        ).stdout
                    )
                )
                == 7
            ),  # type: ignore[arg-type]
            60,
            what="acme's jobs done",
        )
        # paging: newest first, --after the last id shown, no overlap, nothing missed
        first = j(cli("jobs", "--tenant", "acme", "--limit", "4", "--json", env=env).stdout)
        assert isinstance(first, list) and len(first) == 4
        rest = j(
            cli(
                "jobs",
                "--tenant",
                "acme",
                "--limit",
                "4",
                "--after",
                first[-1]["id"],
                "--json",
                env=env,
            ).stdout
        )
        assert isinstance(rest, list)
        assert {x["id"] for x in first} | {x["id"] for x in rest} == {f"p{i:02d}" for i in range(7)}
        assert (
            j(cli("jobs", "--state", "failed", "--since", "1h", "--json", env=env).stdout)[0]["id"]
            == "w2"
        )  # type: ignore[index]
        text = cli("jobs", "--limit", "2", env=env).stdout
        assert "next page: --after" in text
        # status
        st = j(cli("status", "--json", env=env).stdout)
        assert isinstance(st, dict)
        assert st["finished"]["succeeded"] >= 10 and st["finished"]["failed"] == 1
        assert any(w["state"] == "running" for w in st["workers"])
        assert "jobs:" in cli("status", env=env).stdout
        # dead letter: an unknown kind; replay after the kind exists
        publisher.send_raw(
            "jobs.independent",
            b'{"type":"job.submitted","v":1,"job":{"id":"late","tenant":"acme","kind":"later"},'
            b'"submitted_at":1}',
            b"late",
        )
        rows = eventually(
            lambda: j(cli("deadletter", "list", "--json", env=env).stdout), 30, what="dead letter"
        )
        dl = rows[0]  # type: ignore[index]
        shown = cli("deadletter", "show", str(dl["id"]), env=env)
        assert "unknown kind 'later'" in shown.stdout and '"id":"late"' in shown.stdout
        as_json = j(cli("deadletter", "show", str(dl["id"]), "--json", env=env).stdout)
        assert as_json["key"] == "late" and as_json["key_encoding"] == "text"  # type: ignore[index]
        assert as_json["value"].startswith('{"type":"job.submitted"')  # type: ignore[index]
        # a cancelled job keeps the log its start named (absolute: readable from here)
        r = cli("submit", "sleep", "--arg", "seconds=30", "--id", "w3", env=env)
        assert r.returncode == 0, r.stderr
        eventually(
            lambda: j(cli("job", "w3", "--json", env=env).stdout)["state"] == "running",  # type: ignore[index]
            60,
            what="w3 running",
        )
        assert cli("cancel", "w3", env=env).returncode == 0
        eventually(
            lambda: j(cli("job", "w3", "--json", env=env).stdout)["state"] == "cancelled",  # type: ignore[index]
            60,
            what="w3 cancelled",
        )
        log = j(cli("job", "w3", "--json", env=env).stdout)["log_path"]  # type: ignore[index]
        assert log and Path(log).is_absolute() and Path(log).exists(), log
    fixed = load_settings(
        settings_env(settings), kinds={"later": {"command": ["true"], "max_attempts": 1}}
    )
    env2 = settings_env(fixed)
    (tmp_path / "after-fix").mkdir()
    with running(env2, tmp_path / "after-fix", slots=2):
        r = cli("deadletter", "replay", str(dl["id"]), "--json", env=env2)
        assert r.returncode == 0 and j(r.stdout) == {"replayed": [dl["id"]]}
        again = cli("deadletter", "replay", str(dl["id"]), "--json", env=env2)
        assert j(again.stdout) == {"replayed": []}  # idempotent
        said = cli("deadletter", "replay", str(dl["id"]), env=env2)
        assert "nothing to replay" in said.stdout and "--force" in said.stdout

        def late_state() -> object:
            r = cli("job", "late", "--json", env=env2)  # exit 1 until intake has stored it
            return j(r.stdout).get("state") if r.returncode == 0 else None  # type: ignore[union-attr]

        eventually(lambda: late_state() == "succeeded", 60, what="the replayed job ran")


def test_bad_input_and_unreachable_services_give_clear_errors_and_exit_codes(
    settings: Settings, tmp_path: Path
) -> None:
    env = settings_env(settings)
    r = cli("job", "no-such-job", env=env)
    assert r.returncode == 1 and "no job 'no-such-job'" in (r.stdout + r.stderr)
    r = cli("job", "no-such-job", "--json", env=env)
    assert r.returncode == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\njobs: [ {id: a, kind: noop, depends_on: [a]} ]\n")
    r = cli("submit", "--workflow", str(bad), env=env)
    assert r.returncode in (1, 2) and "a" in r.stderr and r.stderr.strip()
    r = cli("submit", "--workflow", str(tmp_path / "missing.yaml"), env=env)
    assert r.returncode in (1, 2) and "missing.yaml" in r.stderr
    r = cli("jobs", "--state", "sleeping", env=env)
    assert r.returncode == 2 and "unknown state 'sleeping'" in r.stderr
    r = cli("jobs", "--since", "yesterday-ish", env=env)
    assert r.returncode == 2 and "--since" in r.stderr
    no_db = {**env, "JOBSTREAM_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    r = cli("status", env=no_db, timeout=120)
    assert r.returncode == 3 and "PostgreSQL" in r.stderr
    no_kafka = {**env, "JOBSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    r = cli("topics", "check", env=no_kafka, timeout=120)
    assert r.returncode == 3 and "127.0.0.1:1" in r.stderr
    # every command that needs a service says which one is down (exit 3), once: not a
    # delivery failure (exit 1), and none of librdkafka's or the pool's per-try lines
    for args in (("submit", "noop"), ("pause", "--tenant", "t"), ("resume", "--kind", "noop")):
        r = cli(*args, env=no_kafka, timeout=120)
        assert r.returncode == 3 and "Kafka at 127.0.0.1:1" in r.stderr, (args, r.stderr)
        assert "%3|" not in r.stderr and "FAIL" not in r.stderr, r.stderr[:500]
    r = cli("status", env=no_db, timeout=120)
    assert "error connecting in" not in r.stderr, r.stderr[:500]
    r = cli("config", "check", env={**env, "JOBSTREAM_WORKER_SLOTS": "lots"})
    assert r.returncode == 2 and "worker_slots" in r.stderr
