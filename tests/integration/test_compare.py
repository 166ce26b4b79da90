"""The side-by-side benchmarks in CI-sized form (``python -m bench SCENARIO --small``): each
scenario runs jobstream, Celery (Redis) and procrastinate (PostgreSQL) for real on loopback
and draws its plot. Times mean nothing at this size; what is asserted is behaviour: every
system ran every job, dependents never started before their dependencies finished, the
rate limit held at admission, and the plots show the systems."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _missing
from tests.png import count_colour, read_png

pytestmark = pytest.mark.timeout(900)

REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:16379")
ALL = ["jobstream", "celery", "procrastinate"]


@pytest.fixture(scope="module")
def peers(kafka_bootstrap: str, pg_template: str) -> Iterator[None]:
    import redis

    try:
        redis.Redis.from_url(REDIS, socket_timeout=5).ping()
    except Exception as exc:
        _missing(f"Redis at {REDIS}", exc)
    yield


def small(scenario: str) -> dict[str, Any]:
    from bench.__main__ import SIZES

    return dict(SIZES[scenario][1])


def run(scenario: str, tmp_path: Path, systems: list[str] = ALL) -> dict[str, Any]:
    from bench.compare import SCENARIOS
    from bench.plots import plot

    result = SCENARIOS[scenario](**small(scenario), systems=systems, show=False)
    png = tmp_path / f"{scenario}.png"
    plot(result, png)
    width, height, _ = read_png(png)
    assert (width, height) == (1210, 462)
    assert count_colour(png, (0x1F, 0x77, 0xB4)) > 50, "jobstream is drawn"
    return result


def test_throughput_runs_every_job_through_every_system(peers: None, tmp_path: Path) -> None:
    r = run("throughput", tmp_path)
    assert set(r["jobs_per_s"]) == set(ALL)  # each finished all its jobs (else: TimeoutError)
    assert all(v > 0 for v in r["jobs_per_s"].values())
    assert {"jobstream_vs_celery", "jobstream_vs_procrastinate"} <= r.keys()
    assert count_colour(tmp_path / "throughput.png", (0x2C, 0xA0, 0x2C)) > 50, "celery drawn"


def test_dag_every_dependent_starts_after_its_dependencies_in_every_system(
    peers: None, tmp_path: Path
) -> None:
    r = run("dag", tmp_path)
    uploads = small("dag")["uploads"]
    for name in ALL:
        unlock = r["unlock_ms"][name]
        # adj2nest, six scanners and the report wait for something: 8 per upload
        assert unlock["samples"] == 8 * uploads, (name, unlock)
        assert unlock["p50"] >= 0, (name, unlock)  # never before the dependency finished


def test_fairness_completes_every_upload_in_every_system(peers: None, tmp_path: Path) -> None:
    r = run("fairness", tmp_path)
    assert set(r["systems"]) == {*ALL, "jobstream-fifo"}
    uploads = r["uploads"]
    for name, v in r["systems"].items():
        assert sum(v["uploads_by_class"].values()) == uploads, name
        assert v["max_slowdown"] >= 1.0, name  # no upload beats its time alone


def test_ratelimit_holds_at_admission_and_says_what_a_peer_cannot_do(
    peers: None, tmp_path: Path
) -> None:
    r = run("ratelimit", tmp_path)
    ours = r["systems"]["jobstream"]
    assert ours["violations_at_admission"] == 0, ours
    assert ours["utilisation"] > 0
    assert r["systems"]["celery"]["supported"] is True
    assert r["systems"]["procrastinate"] == {
        "supported": False,
        "note": "procrastinate has no rate limits",
    }


def test_latency_reports_each_load_level(peers: None, tmp_path: Path) -> None:
    r = run("latency", tmp_path)
    for name in ALL:
        levels = r["systems"][name]["levels"]
        assert set(levels) == {"0.1", "0.5", "0.9"}, name
        for v in levels.values():
            assert v["submit_to_start_ms"]["p50"] <= v["submit_to_start_ms"]["p99"]
            assert v["submit_to_start_ms"]["p50"] <= v["submit_to_finish_ms"]["p50"]


def test_scale_measures_memory_per_queued_job_everywhere(peers: None, tmp_path: Path) -> None:
    r = run("scale", tmp_path)
    for name in ALL:
        assert r["systems"][name]["bytes_per_job"] > 0, name
    assert r["systems"]["jobstream"]["decisions_per_s"] > 0
