"""Metrics on a real InfluxDB 1.6 (the Telegraf stand-in; same line protocol over HTTP and
UDP): hostile tag and field values round-trip, a workload's counts come back exactly, and
every Grafana panel's query returns data."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from agents.metrics import Metrics
from agents.settings import Settings, load_settings
from streams.events import JobSpec
from streams.publisher import JobPublisher
from tests.conftest import Influx, settings_env
from tests.helpers import cli, eventually, running

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parent.parent.parent
HOSTILE = [
    "plain",
    "with space",
    "comma,inside",
    "equals=sign",
    'double "quotes"',
    "single 'quotes'",
    "back\\slash",
    "back\\,slash-comma",
    "ünïcødé ✓ 日本",
    "tab\tinside",
]


def _roundtrip(influx: Influx, url: str, db: str) -> None:
    name = f"esc {uuid.uuid4().hex[:6]},x"  # space and comma in the measurement too
    m = Metrics(url, tags={"app": "t e,s=t"})
    for i, v in enumerate(HOSTILE):
        m.gauge(name, {"value": v, "i": str(i)}, text=v, n=i, ok=True, ratio=0.5)
    assert m.flush()

    def rows() -> list[dict[str, object]]:
        return influx.query(f'SELECT * FROM "{name}"', db=db)  # noqa: S608 - test's own name

    got = eventually(lambda: len(rows()) == len(HOSTILE) and rows(), 30, what="points stored")
    by_i = {int(str(r["i"])): r for r in got}
    for i, v in enumerate(HOSTILE):
        assert by_i[i]["value"] == v  # tag
        assert by_i[i]["text"] == v  # string field
        assert by_i[i]["n"] == i and by_i[i]["ok"] is True and by_i[i]["ratio"] == 0.5
        assert by_i[i]["app"] == "t e,s=t"


def test_hostile_tag_and_field_values_round_trip_over_http(influx: Influx) -> None:
    _roundtrip(influx, influx.write_url, influx.db)


def test_hostile_tag_and_field_values_round_trip_over_udp(influx: Influx) -> None:
    _roundtrip(influx, "udp://127.0.0.1:18089", "udp")  # the UDP listener writes to "udp"


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/jobstream.json").read_text())
    return [(p["title"], t["query"]) for p in dash["panels"] for t in p["targets"]]


def total(influx: Influx, measurement: str, where: str = "") -> float:
    """Sum over processes of each counter series' last total."""
    inner = f'SELECT last("n") AS n FROM "{measurement}" {where} GROUP BY *'  # noqa: S608
    rows = influx.query(f'SELECT sum("n") AS n FROM ({inner})')  # noqa: S608
    return float(str(rows[0]["n"])) if rows and rows[0]["n"] is not None else 0.0


def test_a_workload_is_counted_exactly_and_every_dashboard_panel_has_data(
    settings: Settings, influx: Influx, tmp_path: Path
) -> None:
    s = load_settings(
        settings_env(
            settings.replace(
                metrics_url=influx.write_url,
                metrics_interval_s=0.3,
                rate_limits=[{"scope": "tenant", "limit": 8, "window_s": 1.0}],  # type: ignore[list-item]
            )
        )
    )
    env = settings_env(s)
    ids = [f"m{i}" for i in range(20)]
    with (
        running(env, tmp_path, slots=4),
        JobPublisher(
            s.require_kafka(),
            registry=__import__("streams.topics", fromlist=["x"]).load_topics(
                prefix=s.topic_prefix
            ),
        ) as pub,
    ):
        pub.submit_many(JobSpec(id=i, tenant="acme", kind="noop") for i in ids)
        pub.submit(JobSpec(id="bad", tenant="acme", kind="fail"))
        pub.submit_workflow(
            "wf",
            [
                JobSpec(id="wa", tenant="beta", kind="noop"),
                JobSpec(id="wb", tenant="beta", kind="noop", depends_on=["wa"]),
            ],
        )
        pub.send_raw("jobs.independent", b"{not json", b"x")

        def finished() -> bool:
            out = cli("workflow", "show", "wf", "--json", env=env)
            return out.returncode == 0 and all(
                r["state"] == "succeeded" for r in json.loads(out.stdout)
            )

        eventually(finished, 120, what="workflow done")
        eventually(lambda: total(influx, "jobs_finished") >= 24, 60, what="all finishes counted")
        time.sleep(1.0)  # a few more flushes: gauges, percentiles, lag
    assert total(influx, "jobs_submitted") == 23
    assert total(influx, "jobs_finished", "WHERE \"result\" = 'succeeded'") == 22
    assert total(influx, "jobs_finished", "WHERE \"result\" = 'failed'") == 2  # fail: 2 attempts
    assert total(influx, "admissions") == 24
    assert total(influx, "dead_letters") == 1
    assert total(influx, "admission_denials", "WHERE \"gate\" = 'rate_limit'") >= 1
    assert total(influx, "job_events", "WHERE \"type\" = 'succeeded'") == 22
    # the worker's job events: each sent once (24 attempts: a start and an outcome each, the
    # last beat may predate the last few), in at most as many sends as events
    (w,) = influx.query('SELECT last("events_sent") AS n, last("event_sends") AS s FROM "worker"')
    assert 0 < float(str(w["s"])) <= float(str(w["n"])) <= 48
    for title, query in dashboard_queries():
        q = query.replace("$timeFilter", "time > now() - 1h").replace("$__interval", "1s")
        assert influx.query(q), f"panel {title!r} has no data: {q}"
