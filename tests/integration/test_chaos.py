"""The chaos run in short form (``make chaos`` runs it with 100+ faults): faults injected into
two schedulers and three workers under a mixed workload, then the invariant checker."""

from __future__ import annotations

import pytest

from bench.chaos import run

pytestmark = pytest.mark.timeout(600)


def test_short_chaos_run_loses_nothing_and_breaks_no_invariant(
    kafka_bootstrap: str, pg_template: str
) -> None:
    result = run(faults=8, jobs=240, show=False)
    assert result["faults"] == 8
    assert result["lost"] == 0, result
    assert result["violations"] == [], result["violations"]
    assert result["verdict"] == "pass", result
