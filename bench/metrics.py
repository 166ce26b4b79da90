"""``python -m bench metrics [--json]``: what metrics cost the scheduler.

The whole pipeline (scheduler + 2 workers, Python no-op jobs) three ways, interleaved and
repeated so drift on a shared machine hits all three alike: metrics off, metrics to a live
listener (InfluxDB 1.6's UDP listener, Telegraf's stand-in; ``make services`` starts it), and
metrics to a port where nobody listens (Telegraf down). Reports jobs/s per mode (median of the
rounds) and the cost relative to "off". Target: ≤ 2 % with Telegraf up and down.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from agents.metrics import Metrics
from bench.workers import throughput

MODES = {
    "off": None,
    "telegraf_up": os.environ.get("JOBSTREAM_BENCH_METRICS_UP", "udp://127.0.0.1:18089"),
    "telegraf_down": "udp://127.0.0.1:9",
}


def once(mode: str, jobs: int, show: bool) -> float:
    """Jobs/s of the whole pipeline (scheduler + 2 workers) with metrics in ``mode``."""
    url = MODES[mode]
    extra = {"metrics_url": url, "metrics_interval_s": "1"} if url else {}
    return float(throughput(2, jobs, 8, "pynoop", show, extra)["jobs_per_s"])


def recording_cost(calls: int = 200_000) -> dict[str, float]:
    """CPU of the calls the hot paths make (no I/O), and of one flush of 1,000 series."""
    m = Metrics("udp://127.0.0.1:9")
    tags = {"tenant": "acme", "kind": "nomos"}
    t0 = time.process_time()
    for i in range(calls):
        m.count("jobs_finished", tags)
        m.observe("run_ms", float(i % 1000), tags)
    per_pair = (time.process_time() - t0) / calls
    for i in range(1000):
        m.count("jobs_finished", {"tenant": f"t{i}", "kind": "k"})
    t0 = time.process_time()
    m.flush()
    flush = time.process_time() - t0
    return {
        "count_plus_observe_us": round(per_pair * 1e6, 2),
        "flush_1000_series_ms": round(flush * 1000, 2),
    }


def run(jobs: int, rounds: int, show: bool) -> dict[str, Any]:
    micro = recording_cost()
    results: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES:
            results[mode].append(round(once(mode, jobs, show), 1))
            if show:
                print(f"round {r}: {mode} {results[mode][-1]} jobs/s")
    med = {m: statistics.median(v) for m, v in results.items()}
    return {
        "scenario": "metrics",
        "jobs_per_run": jobs,
        "rounds": rounds,
        "jobs_per_s": results,
        "median_jobs_per_s": med,
        "cost_pct": {
            m: round((med["off"] - med[m]) / med["off"] * 100, 1) for m in MODES if m != "off"
        },
        "target_pct": 2.0,
        "recording": micro,
    }
