"""The stage trace: what processes append, and the unlock path the bench reads from it."""

from __future__ import annotations

from pathlib import Path

from agents.trace import Tracer
from bench.trace import slowest, unlock_stages


def test_stage_lines_and_the_unlock_path_read_from_them(tmp_path: Path) -> None:
    path = tmp_path / "stages.log"
    off = Tracer(None)
    off.mark("ready", "x")  # no file: nothing happens
    assert not path.exists()
    worker, scheduler = Tracer(str(path)), Tracer(str(path))
    worker.mark("finished", "dep", at=100.000)
    worker.mark("outcome_confirmed", "dep", at=100.002)
    scheduler.mark("event_in", "dep", at=100.005)
    scheduler.mark("ready", "job", "other", at=100.011)
    scheduler.mark("round", at=100.0105)  # a round before the release does not count
    scheduler.mark("round", at=100.0115)
    scheduler.mark("snapshot", at=100.0125)
    scheduler.mark("admitted", "job", at=100.016)
    scheduler.mark("send", "job", at=100.0163)
    scheduler.mark("produced", "job", at=100.019)
    worker.mark("fetched", "job", at=100.020)
    worker.mark("started", "job", at=100.0205)
    lines = path.read_text().splitlines()
    assert lines[3].split()[:2] == ["ready", "job"] and lines[4].split()[:2] == ["ready", "other"]
    stages = unlock_stages(path, {"job": "dep"})
    p50 = {name: v["p50"] for name, v in stages.items()}
    assert p50 == {
        "outcome_confirmed": 2.0,
        "to_dependency_agent": 5.0,
        "lifecycle_tx": 6.0,
        "to_round": 0.5,
        "snapshot": 1.0,
        "admission_tx": 3.5,
        "to_producer": 0.3,
        "to_worker": 3.7,
        "dispatch_confirmed": 2.7,
        "to_start": 0.5,
        "unlock": 20.5,
    }
    # the tail, job by job: the slowest unlock first, with its stages
    worker.mark("finished", "dep2", at=200.000)
    worker.mark("started", "slow", at=200.050)
    worst = slowest(path, {"job": "dep", "slow": "dep2"}, n=1)
    assert worst == [{"job": "slow", "unlock": 50.0}]
    assert [w["job"] for w in slowest(path, {"job": "dep", "slow": "dep2"})] == ["slow", "job"]
