"""``python -m bench admission [--jobs N] [--tenants T] [--json]``: the pure admission core.

Measures, in one run: decisions per second with N queued jobs over T tenants (no limits, and
with a per-tenant rate limit plus a kind semaphore), bytes per queued job in the core's index
(tracemalloc), and rate-limit utilisation (admitted ÷ allowed) with the violation count when
demand is 10× a per-tenant limit, waking exactly when the core says.
"""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from collections import defaultdict
from typing import Any

from rich.progress import Progress

from agents.core.admission import AdmissionCore, Policy, QueuedJob, due_time
from agents.core.ratelimit import Limit
from agents.core.semaphores import SLOTS, needs_for

POLICY = Policy()


def _fill(core: AdmissionCore, jobs: int, tenants: int, limited_kind: bool = False) -> None:
    plain = needs_for("nomos", [], None, False)
    limited = needs_for("monk", [], None, True)
    for i in range(jobs):
        kind_limited = limited_kind and i % 4 == 0
        core.enqueue(
            QueuedJob(
                due_time(0.0, (i % 41) - 20, (i * 7919) % 10**9, POLICY),
                f"upload-{i}-nomos",
                f"tenant-{i % tenants}",
                "monk" if kind_limited else "nomos",
                limited if kind_limited else plain,
            )
        )


def decisions_per_s(jobs: int, tenants: int, constrained: bool, repeats: int = 5) -> dict[str, Any]:
    """Admit every queued job, 1,000 decisions a call; ``repeats`` fresh runs, the median
    reported (this shared machine's runs vary by tens of per cent), the spread beside it."""
    rates = []
    admitted = 0
    for _ in range(repeats):
        limits = [Limit("tenant", 1_000_000, 1.0)] if constrained else []
        caps = {SLOTS: jobs, "kind:monk": jobs // 8} if constrained else {SLOTS: jobs}
        core = AdmissionCore(POLICY, limits, caps)
        _fill(core, jobs, tenants, limited_kind=constrained)
        gc.collect()
        start = time.perf_counter()
        admitted = 0
        now = 1.0
        while len(core):
            d = core.decide(now, max_admits=1000)
            if not d.admitted:
                break
            admitted += len(d.admitted)
            now += 0.001
        rates.append(admitted / (time.perf_counter() - start))
        del core
    return {
        "decisions": admitted,
        "per_s": round(statistics.median(rates)),
        "runs_per_s": [round(r) for r in rates],
    }


def bytes_per_job(jobs: int, tenants: int) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    core = AdmissionCore(POLICY, [], {SLOTS: 1})
    _fill(core, jobs, tenants)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return round((after - before) / jobs, 1)


def utilisation(limit: int = 50, window_s: float = 1.0, windows: int = 20) -> dict[str, Any]:
    core = AdmissionCore(POLICY, [Limit("tenant", limit, window_s)], {SLOTS: 10**9})
    demand = limit * windows * 10
    _fill(core, demand, 1)
    times: list[float] = []
    now, horizon = 0.0, windows * window_s
    while now < horizon:
        d = core.decide(now)
        times += [now] * len(d.admitted)
        for a in d.admitted:  # each starts when admitted
            core.rates.starts.started(a.job.id, now)
        now = d.wake_at if d.wake_at is not None else horizon
    times = [t for t in times if t < horizon]
    violations = 0
    per_window = defaultdict(int)
    j = 0
    for i, x in enumerate(times):  # two pointers: admissions in (x - W, x]
        while x - window_s >= times[j]:
            j += 1
        if i - j + 1 > limit:
            violations += 1
        per_window[int(x // window_s)] += 1
    allowed = limit * windows
    return {
        "limit": f"{limit}/{window_s:g}s",
        "demand": demand,
        "admitted": len(times),
        "allowed": allowed,
        "utilisation": round(len(times) / allowed, 4),
        "violations": violations,
    }


def run(jobs: int, tenants: int, show: bool) -> dict[str, Any]:
    with Progress(disable=not show) as progress:
        task = progress.add_task("admission core", total=4)
        plain = decisions_per_s(jobs, tenants, constrained=False)
        progress.advance(task)
        constrained = decisions_per_s(jobs, tenants, constrained=True)
        progress.advance(task)
        mem = bytes_per_job(jobs, tenants)
        progress.advance(task)
        util = utilisation()
        progress.advance(task)
    return {
        "scenario": "admission",
        "queued_jobs": jobs,
        "tenants": tenants,
        "decisions_per_s": plain["per_s"],
        "decisions_per_s_runs": plain["runs_per_s"],
        "decisions_per_s_with_rate_limit_and_semaphore": constrained["per_s"],
        "decisions_per_s_with_rate_limit_and_semaphore_runs": constrained["runs_per_s"],
        "bytes_per_queued_job": mem,
        "ratelimit": util,
        "targets": {
            "decisions_per_s": 200_000,
            "bytes_per_queued_job": 300,
            "utilisation": 0.99,
            "violations": 0,
        },
    }
