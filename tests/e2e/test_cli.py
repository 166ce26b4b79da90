"""The CLI as a user runs it: subprocesses, exit codes, JSON output."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from agents.settings import Settings
from tests.conftest import settings_env
from tests.helpers import cli, eventually, running

pytestmark = pytest.mark.e2e


def last_json(stdout: str) -> dict[str, object]:
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def test_the_embedded_demo_tells_every_part_of_the_story_and_prints_nothing_else(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    env["JOBSTREAM_STATE_DIR"] = str(tmp_path / "demo")
    env["JOBSTREAM_STATUS_BIND"] = "127.0.0.1:0"  # any free port: tests may run side by side
    r = cli("demo", "--jobs", "300", "--json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # nothing but the summary: one JSON line on stdout, nothing on stderr (no library logs,
    # warnings or cursor codes; the progress display is off under --json)
    assert len(r.stdout.strip().splitlines()) == 1, r.stdout[-2000:]
    assert r.stderr == "", r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["services"]["postgres"] == "embedded"
    assert str(out["services"]["kafka"]).startswith("embedded mock cluster")
    parts = out["parts"]
    b = parts["burst"]
    assert b["jobs"] == b["succeeded"] == 300 and b["jobs_per_s"] > 0
    assert 0 < b["submit_to_start_ms"]["p50"] <= b["submit_to_start_ms"]["p99"]
    w = parts["workflows"]
    assert w["workflows"] == 6 and w["jobs"] == 30 and w["succeeded"] == 25
    assert w["dependents"] == w["dependents_failed_with_root_cause"] == 4  # root cause named
    f = parts["fairness"]
    assert f["small_jobs"] == 12 and f["small_done_p95_s"] < f["flood_done_s"]
    rl = parts["rate_limit"]
    assert rl["jobs"] == 15 and rl["max_admitted_in_a_window"] == 5  # what the limit counts
    assert rl["admitted_span_s"] >= 2.0  # 5 a second: three windows
    t = parts["time"]
    assert t["started_after_s"] >= t["delay_s"] and t["tick_jobs_succeeded"] == t["ticks"] == 3
    assert parts["dead_letters"] == {"malformed_events": 3, "dead_lettered": 3}
    assert out["lost"] == 0 and out["jobs"] == 300 + 30 + 172 + 15 + 1 + 3
    assert set(out["story"]) == {"burst", "workflows", "fairness", "rate limit", "time",
                                 "dead letters"}  # fmt: skip


def test_config_check_reports_bad_settings_with_exit_code_2() -> None:
    env = dict(os.environ, JOBSTREAM_WORKER_SLOTS="lots")
    r = cli("config", "check", env=env)
    assert r.returncode == 2
    assert "worker_slots" in r.stderr


def test_a_bad_setting_names_its_variable_and_a_typo_is_warned_of() -> None:
    env = dict(os.environ, JOBSTREAM_HEARTBEAT_INTERVAL_S="soon")
    r = cli("config", "check", "--json", env=env)
    assert r.returncode == 2
    err = json.loads(r.stdout)
    assert "JOBSTREAM_HEARTBEAT_INTERVAL_S='soon'" in err["error"] and err["code"] == 2
    env = dict(os.environ, JOBSTREAM_WROKER_SLOTS="3")
    r = cli("config", "check", env=env)
    assert r.returncode == 0
    assert "JOBSTREAM_WROKER_SLOTS is not a setting" in r.stderr
    assert "did you mean JOBSTREAM_WORKER_SLOTS" in r.stderr


def test_the_configuration_reference_is_the_one_the_command_prints() -> None:
    r = cli("config", "doc")
    assert r.returncode == 0 and "`JOBSTREAM_STATUS_TOKEN`" in r.stdout
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert r.stdout in doc


def test_config_check_never_prints_secrets() -> None:
    env = dict(os.environ, JOBSTREAM_DATABASE_URL="postgresql://app:topsecret@db/x")
    r = cli("config", "check", "--json", env=env)
    assert r.returncode == 0 and "topsecret" not in r.stdout + r.stderr
    assert json.loads(r.stdout)["database_url"] == "postgresql://app:***@db/x"


def test_topics_apply_then_check_and_report_a_partition_mismatch(kafka_bootstrap: str) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}."
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(prefix + "jobs.ready", 2, 1)])[prefix + "jobs.ready"].result()
    env = dict(os.environ, JOBSTREAM_KAFKA_BOOTSTRAP=kafka_bootstrap, JOBSTREAM_TOPIC_PREFIX=prefix)
    r = cli("topics", "apply", "--json", env=env)
    assert r.returncode == 1, "a partition mismatch must fail"
    report = json.loads(r.stdout)
    assert len(report["created"]) == 9
    assert report["mismatched"] == [
        f"{prefix}jobs.ready: cluster has 2 partitions, topics.yaml says 6"
    ]
    r = cli("topics", "check", "--json", env=env)
    assert r.returncode == 1 and json.loads(r.stdout)["created"] == []


def test_unreachable_kafka_exits_3() -> None:
    env = dict(os.environ, JOBSTREAM_KAFKA_BOOTSTRAP="127.0.0.1:1")
    r = cli("topics", "check", env=env, timeout=120)
    assert r.returncode == 3, r.stderr
    assert "not answer" in r.stderr or "cannot" in r.stderr


def test_submit_job_and_deadletter_commands(settings: Settings, tmp_path: Path) -> None:
    env = settings_env(settings)
    with running(env, tmp_path, slots=2):
        marker = tmp_path / "cli-ran"
        r = cli(
            "submit",
            "touch",
            "--id",
            "cli-1",
            "--tenant",
            "ops",
            "--arg",
            f"path={marker}",
            "--json",
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"id": "cli-1", "submitted": True}
        r = cli("submit", "no-such-kind", env=env)
        assert r.returncode == 2 and "unknown kind" in r.stderr

        def done() -> dict[str, object] | None:
            res = cli("job", "cli-1", "--json", env=env)
            if res.returncode != 0:
                return None
            data = json.loads(res.stdout)
            return data if data["state"] == "succeeded" else None

        job = eventually(done, 90, interval=0.5, what="cli-1 succeeded")
        assert marker.exists()
        assert [h["event"] for h in job["history"]] == [  # type: ignore[index]
            "accepted",
            "dispatched",
            "started",
            "succeeded",
        ]
        assert cli("job", "nope", env=env).returncode == 1
        from streams.publisher import JobPublisher
        from streams.topics import load_topics

        with JobPublisher(
            settings.require_kafka(), registry=load_topics(prefix=settings.topic_prefix)
        ) as pub:
            pub.send_raw("jobs.independent", b"garbage", b"k")

        def letters() -> list[dict[str, object]]:
            res = cli("deadletter", "list", "--json", env=env)
            return json.loads(res.stdout) if res.returncode == 0 else []  # type: ignore[no-any-return]

        rows = eventually(letters, 60, interval=0.5, what="a dead letter")
        assert "malformed JSON" in str(rows[0]["reason"])
