"""The production shape cannot run here (no Docker engine), so its files are cross-checked:
docker-compose.yml, deploy/telegraf.conf, deploy/grafana/, deploy/jobstream.yaml, the
Dockerfile and topics.yaml must agree on service names, ports, databases and topics."""

from __future__ import annotations

import json
import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from agents.settings import load_settings
from streams.topics import load_topics

ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
TELEGRAF = tomllib.loads((ROOT / "deploy/telegraf.conf").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def env_of(service: str) -> dict[str, str]:
    env = dict(SERVICES[service].get("environment") or {})
    # ${VAR:-default} as compose would substitute it with nothing set
    return {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def test_every_service_is_there_and_dependencies_exist() -> None:
    expected = {
        "kafka",
        "postgres",
        "init",
        "scheduler",
        "worker",
        "influxdb",
        "telegraf",
        "grafana",
    }
    assert expected <= set(SERVICES)
    for name, svc in SERVICES.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes") or []:
            src = str(vol).split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"


def test_jobstream_settings_in_compose_are_valid_and_point_at_services() -> None:
    for role in ("scheduler", "worker", "init"):
        env = env_of(role)
        s = load_settings(
            {k: v for k, v in env.items() if k != "JOBSTREAM_CONFIG"},
            file=ROOT / "deploy/jobstream.yaml",
        )
        host, port = s.require_kafka().split(":")
        assert host in SERVICES and port == "9092"
        assert urllib.parse.urlsplit(s.require_database()).hostname in SERVICES
        metrics = urllib.parse.urlsplit(s.metrics_url or "")
        assert metrics.hostname in SERVICES
        listener = TELEGRAF["inputs"]["socket_listener"][0]["service_address"]
        assert listener == f"{metrics.scheme}://:{metrics.port}"


def test_telegraf_outputs_match_influxdb_grafana_and_topics() -> None:
    influx_out = TELEGRAF["outputs"]["influxdb"][0]
    assert urllib.parse.urlsplit(influx_out["urls"][0]).hostname in SERVICES
    assert SERVICES["influxdb"]["environment"]["INFLUXDB_DB"] == influx_out["database"]
    kafka_out = TELEGRAF["outputs"]["kafka"][0]
    assert kafka_out["topic"] in load_topics().physical()
    assert kafka_out["brokers"] == [env_of("scheduler")["JOBSTREAM_KAFKA_BOOTSTRAP"]]
    ds = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/influxdb.yaml").read_text()
    )["datasources"][0]
    assert urllib.parse.urlsplit(ds["url"]).hostname in SERVICES
    assert ds["jsonData"]["dbName"] == influx_out["database"]
    dash = json.loads((ROOT / "deploy/grafana/dashboards/jobstream.json").read_text())
    assert dash["panels"] and all(p["datasource"]["uid"] == ds["uid"] for p in dash["panels"])
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/jobstream.yaml").read_text()
    )["providers"][0]
    mounts = [str(v) for v in SERVICES["grafana"]["volumes"]]
    assert any(m.endswith(":" + provider["options"]["path"] + ":ro") for m in mounts)


def test_dockerfile_copies_what_exists() -> None:
    for line in (ROOT / "deploy/Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
