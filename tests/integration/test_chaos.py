"""The chaos run in short form (``make chaos`` runs it with 100+ faults): every fault kind at
least once, injected into two schedulers and three workers while a mixed workload arrives,
then the invariant checker and the scanners' ledger (no resource over-committed by running
processes), and the sampled "no job without a live owner"."""

from __future__ import annotations

import pytest

from bench.chaos import run
from bench.faults import FAULTS

pytestmark = pytest.mark.timeout(900)


def test_short_chaos_run_draws_every_fault_kind_and_breaks_no_invariant(
    kafka_bootstrap: str, pg_template: str
) -> None:
    result = run(faults=len(FAULTS), jobs=240, show=False)
    assert set(result["faults_injected"]) == set(FAULTS), result["faults_injected"]
    assert result["operator_commands"] > 0, result  # cancels and retries of running jobs
    assert result["lost"] == 0, result
    assert result["violations"] == [], result["violations"]
    # sampled after every fault: no job running, or dispatched on a partition no live worker
    # consumes, without a live owner past the liveness bound (plus a margin)
    assert result["unowned"] == [], result["unowned"]
