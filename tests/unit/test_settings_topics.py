"""Settings validation and the topic registry."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from agents.errors import ConfigError
from agents.settings import Settings, load_settings, mask_secrets, redact_url
from agents.settings_doc import MEANINGS, table
from streams.errors import TopicConfigError
from streams.topics import REQUIRED, load_topics, parse_duration_ms, parse_topics


def test_environment_overrides_file_and_is_validated(tmp_path: Path) -> None:
    f = tmp_path / "js.yaml"
    f.write_text("worker_slots: 3\nkinds:\n  scan:\n    command: [scan, '{file}']\n")
    s = load_settings({"JOBSTREAM_WORKER_SLOTS": "7"}, file=f)
    assert s.worker_slots == 7
    assert s.kinds["scan"].command == ["scan", "{file}"]
    assert "noop" in s.kinds, "default kinds stay available"


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"JOBSTREAM_WORKER_SLOTS": "many"}, "worker_slots"),
        ({"JOBSTREAM_WORKER_SLOTS": "0"}, "worker_slots"),
        ({"JOBSTREAM_KINDS": "{not json"}, "must be JSON"),
        ({"JOBSTREAM_KINDS": '{"x": {"command": []}}'}, "command"),
        ({"JOBSTREAM_KINDS": '{"Bad Kind": {"command": ["true"]}}'}, "invalid kind name"),
        ({"JOBSTREAM_LOG_LEVEL": "LOUD"}, "log_level"),
        ({"JOBSTREAM_TOPIC_PREFIX": "a b"}, "topic_prefix"),
    ],
)
def test_bad_settings_say_what_is_wrong(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings(env)


def test_a_bad_value_names_its_variable_and_value_and_a_bad_kind_its_name(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as bad:
        load_settings({"JOBSTREAM_HEARTBEAT_INTERVAL_S": "soon"})
    assert "JOBSTREAM_HEARTBEAT_INTERVAL_S='soon'" in str(bad.value)
    f = tmp_path / "js.yaml"
    f.write_text("kinds:\n  scan:\n    command: [scan]\n    timeout_s: -1\n")
    with pytest.raises(ConfigError) as kind:
        load_settings({}, file=f)
    assert "kind 'scan'" in str(kind.value) and str(f) in str(kind.value)
    assert "timeout_s" in str(kind.value)


def test_an_unknown_variable_is_warned_of_with_the_closest_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="jobstream.settings"):
        s = load_settings({"JOBSTREAM_WROKER_SLOTS": "3", "JOBSTREAM_JOB_ID": "j1"})
    assert s.worker_slots == 4
    assert "JOBSTREAM_WROKER_SLOTS is not a setting" in caplog.text
    assert "did you mean JOBSTREAM_WORKER_SLOTS" in caplog.text
    assert "JOB_ID" not in caplog.text  # a job's own variable is not a typo


def test_unknown_setting_in_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "js.yaml"
    f.write_text("wroker_slots: 3\n")
    with pytest.raises(ConfigError, match="wroker_slots"):
        load_settings({}, file=f)


def test_secrets_are_redacted() -> None:
    s = load_settings(
        {
            "JOBSTREAM_DATABASE_URL": "postgresql://app:s3cret@db/js",
            "JOBSTREAM_KAFKA_CONFIG": '{"sasl.password": "hunter2", "acks": "all"}',
        }
    )
    text = repr(s.redacted())
    assert "s3cret" not in text and "hunter2" not in text and "'acks': 'all'" in text


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cret@db/js",
        "postgresql://app:s3cret@db:5432/js?sslmode=require",
        "postgresql://app@db/js?password=s3cret&sslmode=require",
        "postgresql://db/js?sslmode=require&PASSWORD=s3cret",
        "host=db user=app password=s3cret dbname=js",
        "host=db password = s3cret dbname=js",
        "host=db password='s3 cret' dbname=js",
    ],
)
def test_every_form_of_database_password_is_redacted(url: str) -> None:
    out = redact_url(url)
    assert "s3cret" not in out and "s3 cret" not in out and "***" in out, out
    assert "db" in out


def test_private_keys_and_secret_env_values_are_redacted() -> None:
    s = load_settings(
        {
            "JOBSTREAM_KAFKA_CONFIG": json.dumps(
                {"ssl.key.pem": "-----BEGIN PRIVATE KEY-----x", "ssl.ca.location": "/ca.pem"}
            )
        }
    )
    text = repr(s.redacted())
    assert "PRIVATE KEY" not in text and "/ca.pem" in text
    env = {"API_TOKEN": "tok-12345", "HOME": "/home/job"}
    assert mask_secrets("auth failed with tok-12345 in /home/job", env) == (
        "auth failed with *** in /home/job"
    )


def test_topics_yaml_is_complete_and_co_partitioned() -> None:
    reg = load_topics(prefix="x.")
    assert set(REQUIRED) <= set(reg.specs)
    assert reg.name("jobs.events") == "x.jobs.events"
    assert reg["jobs.dependent"].partitions == reg["jobs.events"].partitions
    for spec in reg.specs.values():
        assert spec.key and spec.doc


def test_co_partitioning_mismatch_is_rejected() -> None:
    doc = {"topics": {t: {"key": "k", "partitions": 1} for t in REQUIRED}}
    doc["topics"]["jobs.events"] = {
        "key": "k",
        "partitions": 2,
        "co_partitioned_with": "jobs.dependent",
    }
    with pytest.raises(TopicConfigError, match="equal partition counts"):
        parse_topics(doc)


def test_durations() -> None:
    assert parse_duration_ms("7d") == 7 * 86_400_000
    assert parse_duration_ms("250ms") == 250
    with pytest.raises(TopicConfigError):
        parse_duration_ms("soon")


ROOT = Path(__file__).resolve().parents[2]


def test_deploy_settings_file_is_valid() -> None:
    s = load_settings({}, file=ROOT / "deploy/jobstream.yaml")
    assert {"nomos", "monk", "copyright"} <= set(s.kinds)


def test_compose_runs_the_broker_version_the_tests_run() -> None:
    import re

    script = (ROOT / "scripts/kafka.sh").read_text()
    tested = re.search(r'KAFKA_VERSION="\$\{KAFKA_VERSION:-([0-9.]+)\}"', script)
    assert tested is not None
    compose = (ROOT / "docker-compose.yml").read_text()
    assert f"image: apache/kafka:{tested.group(1)}" in compose
    assert "image: postgres:15" in compose


@pytest.mark.parametrize("bind", ["0.0.0.0:8080", "10.1.2.3:80", "[::]:8080", "example.org:80"])
def test_a_status_page_off_loopback_needs_a_token(bind: str) -> None:
    with pytest.raises(ConfigError, match="not loopback: set status_token"):
        load_settings({"JOBSTREAM_STATUS_BIND": bind})
    s = load_settings({"JOBSTREAM_STATUS_BIND": bind, "JOBSTREAM_STATUS_TOKEN": "t0ken-123"})
    assert s.status_bind == bind
    for loopback in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080"):
        assert not load_settings({"JOBSTREAM_STATUS_BIND": loopback}).status_token


def test_the_configuration_reference_lists_every_setting_as_the_object_defines_it() -> None:
    """docs/configuration.md's table is the one generated from the settings object: a
    setting added without a meaning, or a default changed without the document, fails here."""
    assert set(MEANINGS) == {f.name for f in msgspec.structs.fields(Settings)}
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert table() in doc, "regenerate it: jobstream config doc"
