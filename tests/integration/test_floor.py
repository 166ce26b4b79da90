"""The floor benchmark's bare roles (``bench/floor.py``, ``bench/pipeline.py``) do the work
they stand for, on real Kafka and PostgreSQL: a floor that skipped part of the required work
would understate it. Times mean nothing at this size; what is asserted is that every unlock
was recorded durably and reached the starting side, every job ran in a pool interpreter and
was reported, and the batched pipeline recorded every job and its events."""

from __future__ import annotations

import pytest

from bench.floor import unlock_floor, worker_floor
from bench.pipeline import pipeline_floor

pytestmark = pytest.mark.timeout(300)


def test_unlock_floor_records_every_unlock_and_delivers_it(
    kafka_bootstrap: str, pg_template: str
) -> None:
    result = unlock_floor(24, 40.0, show=False)
    assert result["recorded_in_postgres"] == 24, result
    latency = result["unlock_latency_ms"]
    assert latency["samples"] == 24, result
    assert 0 < latency["p50"] <= latency["p99"], result


def test_worker_floor_runs_every_job_in_the_pool_and_reports_it(
    kafka_bootstrap: str, pg_template: str
) -> None:
    result = worker_floor(False, jobs=120)
    assert result["succeeded"] == 120, result
    assert result["logs_written"] == 120, result  # each job ran in a pycall interpreter
    assert result["worker_cpu_us_per_job"] > 0, result


def test_pipeline_floor_records_every_job_and_its_events(
    kafka_bootstrap: str, pg_template: str
) -> None:
    """The bare batched pipeline inserts each job, dispatches it, records its start and
    its success: three history rows per job, every job succeeded in PostgreSQL."""
    result = pipeline_floor(300, show=False)
    assert result["succeeded"] == 300, result
    assert result["history_rows"] == 900, result
    assert result["scheduler_cpu_us_per_job"] > 0, result
