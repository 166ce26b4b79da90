"""The unlock path stage by stage, from the processes' stage timestamps (``agents.trace``).

For each dependent job J and the dependency X that released it (the one that finished last):
X's process ended → its outcome confirmed / → the dependency agent has the event → J ready
(lifecycle transaction committed) → the next admission round starts → its semaphore snapshot
→ J admitted (admission transaction committed) → J handed to the producer → the worker has
the dispatch → J started. A job admitted inside the cycle that released it is ready and
admitted by one commit: its round stages (``to_round``, ``snapshot``, ``admission_tx``) are
absent. Times are wall clocks of the processes on one host.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from pathlib import Path
from typing import Any

from agents.core.stats import pct

STAGES = [
    ("outcome_confirmed", "finished", "outcome_confirmed"),
    ("to_dependency_agent", "finished", "event_in"),
    ("lifecycle_tx", "event_in", "ready"),
    ("to_round", "ready", "round"),
    ("snapshot", "round", "snapshot"),
    ("admission_tx", "snapshot", "admitted"),
    ("to_producer", "admitted", "send"),
    ("to_worker", "send", "fetched"),
    ("dispatch_confirmed", "send", "produced"),
    ("to_start", "fetched", "started"),
    ("unlock", "finished", "started"),
]


def read(path: Path) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """(job → stage → first time), (stage without a job → sorted times)."""
    jobs: dict[str, dict[str, float]] = defaultdict(dict)
    plain: dict[str, list[float]] = defaultdict(list)
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 4:
            continue
        stage, job, at = parts[0], parts[1], float(parts[2])
        if job == "-":
            plain[stage].append(at)
        else:
            jobs[job].setdefault(stage, at)
    for times in plain.values():
        times.sort()
    return jobs, plain


def _next(times: list[float], after: float) -> float | None:
    i = bisect.bisect_left(times, after)
    return times[i] if i < len(times) else None


def per_unlock(path: Path, released_by: dict[str, str]) -> dict[str, dict[str, float]]:
    """Each dependent's stage durations (ms) on its unlock path (``released_by``: dependent →
    the dependency that finished last); a stage whose marks are missing is left out."""
    jobs, plain = read(path)
    out: dict[str, dict[str, float]] = {}
    for dep_id, dep_of in released_by.items():
        j, x = jobs.get(dep_id, {}), jobs.get(dep_of, {})
        t = {f"x.{k}": v for k, v in x.items()} | j
        if "ready" in j and (r := _next(plain["round"], j["ready"])) is not None:
            t["round"] = r
            if (s := _next(plain["snapshot"], r)) is not None:
                t["snapshot"] = s
        stages: dict[str, float] = {}
        for name, a, b in STAGES:
            a_key = f"x.{a}" if a in ("finished", "outcome_confirmed", "event_in") else a
            b_key = f"x.{b}" if b in ("outcome_confirmed", "event_in") else b
            if a_key in t and b_key in t:
                stages[name] = (t[b_key] - t[a_key]) * 1000
        out[dep_id] = stages
    return out


def unlock_stages(path: Path, released_by: dict[str, str]) -> dict[str, Any]:
    """p50/p90/p99 (ms) of each stage over the dependents in ``released_by`` (dependent →
    the dependency that finished last)."""
    samples: dict[str, list[float]] = defaultdict(list)
    for stages in per_unlock(path, released_by).values():
        for name, ms in stages.items():
            samples[name].append(ms)
    return {
        name: {
            "p50": _r(pct(samples[name], 50)),
            "p90": _r(pct(samples[name], 90)),
            "p99": _r(pct(samples[name], 99)),
            "n": len(samples[name]),
        }
        for name, _, _ in STAGES
    }


def slowest(path: Path, released_by: dict[str, str], n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` slowest unlocks with their stages (ms): where a tail comes from (a cold
    start, a stalled broker, a busy agent) is rarely where the median goes."""
    rows = sorted(
        per_unlock(path, released_by).items(),
        key=lambda kv: kv[1].get("unlock", 0.0),
        reverse=True,
    )
    return [
        {"job": job, **{name: _r(ms) for name, ms in stages.items()}}
        for job, stages in rows[:n]
        if "unlock" in stages
    ]


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
