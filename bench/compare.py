"""jobstream side by side with Celery (Redis) and procrastinate (PostgreSQL), same jobs, same
machine, same run. ``python -m bench throughput|latency|dag|fairness|ratelimit|scale``.

Systems run one after another inside each round and the order rotates from round to round,
so drift in the machine's load hits each of them; results are medians over rounds plus
ratios (jobstream ÷ peer). Sizes default to the full ones of the benchmark issue; ``--small``
gives the CI-sized form that ``make test`` runs (proves it works, times mean nothing).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from agents.core.stats import ms, pct
from bench.systems import SYSTEMS, Job, Jobstream, System
from bench.workflow import SCANNERS

Result = dict[str, Any]


def rotations(names: Sequence[str], rounds: int) -> list[list[str]]:
    return [[names[(r + i) % len(names)] for i in range(len(names))] for r in range(rounds)]


def ratios(per_system: dict[str, float | None], better: str = "higher") -> dict[str, float | None]:
    """jobstream ÷ each peer (``higher`` is better) or peer ÷ jobstream (``lower``)."""
    ours = per_system.get("jobstream")
    out: dict[str, float | None] = {}
    for name, value in per_system.items():
        if name == "jobstream" or not ours or not value:
            continue
        out[f"jobstream_vs_{name}"] = round(ours / value if better == "higher" else value / ours, 2)
    return out


def noop_jobs(prefix: str, n: int, tenants: int = 8) -> list[Job]:
    return [Job(f"{prefix}{i}", t=f"t{i % tenants}") for i in range(n)]


# -- 1. throughput ------------------------------------------------------------------------


def throughput(jobs: int, rounds: int, slots: int, systems: Sequence[str], show: bool) -> Result:
    """``jobs`` no-op jobs submitted at once; end to end (first submit → last finished)."""
    runs: dict[str, list[float]] = defaultdict(list)
    for order in rotations(systems, rounds):
        for name in order:
            with SYSTEMS[name](slots) as system:
                start = time.monotonic()
                for i in range(0, jobs, 5000):
                    system.submit(noop_jobs(f"n{i}-", min(5000, jobs - i)))
                system.wait(jobs, show, f"{jobs} no-op jobs")
                runs[name].append(round(jobs / (time.monotonic() - start), 1))
    median = {name: statistics.median(v) for name, v in runs.items()}
    return {
        "scenario": "throughput",
        "jobs": jobs,
        "slots": slots,
        "jobs_per_s_runs": dict(runs),
        "jobs_per_s": median,
        **ratios(dict(median)),
    }


# -- 2. latency ---------------------------------------------------------------------------


def paced(system: System, jobs: Sequence[Job], rate: float) -> None:
    """Submit ``jobs`` at ``rate`` per second, in small bursts every 5 ms."""
    start = time.monotonic()
    sent = 0
    while sent < len(jobs):
        due = min(len(jobs), int((time.monotonic() - start) * rate) + 1)
        if due > sent:
            system.submit(jobs[sent:due])
            sent = due
        time.sleep(0.005)


def latency(
    seconds: float,
    levels: Sequence[float],
    probe: int,
    slots: int,
    systems: Sequence[str],
    show: bool,
) -> Result:
    """Each system's saturation (``probe`` jobs at once), then ``seconds`` of paced load at
    each level (a fraction of that saturation): submit→start and submit→finish."""
    out: dict[str, Any] = {}
    for name in systems:
        with SYSTEMS[name](slots) as system:
            start = time.monotonic()
            system.submit(noop_jobs("probe", probe))
            system.wait(probe, show, "saturation probe")
            saturation = probe / (time.monotonic() - start)
            done = probe
            levels_out: dict[str, Any] = {}
            for level in levels:
                rate = saturation * level
                n = max(20, int(rate * seconds))
                jobs = noop_jobs(f"l{level}-", n)
                paced(system, jobs, rate)
                done += n
                system.wait(done, show, f"{level:.0%} of saturation")
                t = [r for r in system.timings() if r["k"].startswith(f"l{level}-")]
                to_start = [r["a"] - r["s"] for r in t]
                to_finish = [r["f"] - r["s"] for r in t]
                levels_out[f"{level:g}"] = {
                    "rate_per_s": round(rate, 1),
                    "jobs": n,
                    "submit_to_start_ms": {
                        "p50": ms(pct(to_start, 50)),
                        "p99": ms(pct(to_start, 99)),
                    },
                    "submit_to_finish_ms": {
                        "p50": ms(pct(to_finish, 50)),
                        "p99": ms(pct(to_finish, 99)),
                    },
                }
            out[name] = {"saturation_jobs_per_s": round(saturation, 1), "levels": levels_out}
    at_half = {
        name: v["levels"].get("0.5", {}).get("submit_to_start_ms", {}).get("p50")
        for name, v in out.items()
    }
    return {
        "scenario": "latency",
        "seconds_per_level": seconds,
        "slots": slots,
        "systems": out,
        **{f"{k}_p50_start_at_half": v for k, v in ratios(at_half, better="lower").items()},
    }


# -- 3. dag -------------------------------------------------------------------------------


def dag(uploads: int, rounds: int, slots: int, systems: Sequence[str], show: bool) -> Result:
    """``uploads`` FOSSology-shaped workflows (9 jobs each) submitted at once."""
    runs: dict[str, list[float]] = defaultdict(list)
    unlock: dict[str, list[float]] = defaultdict(list)
    total = uploads * (2 + len(SCANNERS) + 1)
    for order in rotations(systems, rounds):
        for name in order:
            with SYSTEMS[name](slots) as system:
                start = time.monotonic()
                system.submit_workflows([f"up{i}" for i in range(uploads)])
                system.wait(total, show, f"{uploads} workflows")
                runs[name].append(round(uploads / (time.monotonic() - start), 2))
                unlock[name] += [r["a"] - r["d"] for r in system.timings() if r.get("d")]
    median = {name: statistics.median(v) for name, v in runs.items()}
    return {
        "scenario": "dag",
        "uploads": uploads,
        "jobs_each": 9,
        "slots": slots,
        "workflows_per_s_runs": dict(runs),
        "workflows_per_s": median,
        "unlock_ms": {
            name: {"p50": ms(pct(v, 50)), "p99": ms(pct(v, 99)), "samples": len(v)}
            for name, v in unlock.items()
        },
        **ratios(dict(median)),
        "note": "Celery: chain + chord; procrastinate: tasks defer their successors, a "
        "counter row per upload for the fan-in (it has no dependencies of its own)",
    }


# -- 4. fairness --------------------------------------------------------------------------


def uploads_workload(
    n: int, huge_chunks: int, slots: int, unit: float, seed: int = 7
) -> list[tuple[float, str, str, int]]:
    """(arrival offset s, upload id, tenant, chunks): one huge upload at 0 from tenant t0,
    then ``n`` uploads with Pareto-distributed sizes (α 1.2, capped at 40 chunks) arriving
    as a Poisson process over the time the huge one needs alone."""
    rng = random.Random(seed)
    alone = math.ceil(huge_chunks / slots) * unit
    out = [(0.0, "huge0", "t0", huge_chunks)]
    t = 0.0
    for i in range(n):
        t += rng.expovariate(n / (alone * 0.8))
        chunks = min(40, int(rng.paretovariate(1.2)))
        out.append((t, f"up{i}", f"t{1 + i % 3}", max(1, chunks)))
    return out


def size_class(chunks: int, huge: int) -> str:
    if chunks >= huge:
        return "huge"
    if chunks <= 2:
        return "small"
    return "medium" if chunks <= 10 else "large"


def fairness(
    uploads: int, huge_chunks: int, unit: float, slots: int, systems: Sequence[str], show: bool
) -> Result:
    """Heavy-tailed uploads while a huge one runs; slowdown = completion time ÷ time alone
    (chunks spread over the slots). ``jobstream-fifo`` is jobstream told nothing: one
    tenant, no sizes, so its due times are arrival order (plain FIFO)."""
    workload = uploads_workload(uploads, huge_chunks, slots, unit)
    total = sum(c for *_, c in workload)
    out: dict[str, Any] = {}
    for name in [*systems, "jobstream-fifo"] if "jobstream" in systems else systems:
        fifo = name == "jobstream-fifo"
        with SYSTEMS["jobstream" if fifo else name](slots) as system:
            start = time.monotonic()
            for offset, u, tenant, chunks in workload:
                delay = start + offset - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                system.submit(
                    [
                        Job(
                            f"{u}-c{c}",
                            t="t0" if fifo else tenant,
                            seconds=unit,
                            size=0 if fifo else chunks * 10_000_000,
                        )
                        for c in range(chunks)
                    ]
                )
            system.wait(total, show, f"{len(workload)} uploads, {total} chunks")
            timings = system.timings()
        by_upload: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in timings:
            by_upload[r["k"].rsplit("-", 1)[0]].append(r)
        huge_end = max(r["f"] for r in by_upload["huge0"])
        slow: dict[str, list[float]] = defaultdict(list)
        small_during: list[float] = []
        small_times: list[float] = []
        for _, u, _, chunks in workload:
            rs = by_upload[u]
            took = max(r["f"] for r in rs) - min(r["s"] for r in rs)
            slowdown = took / (math.ceil(chunks / slots) * unit)
            cls = size_class(chunks, huge_chunks)
            slow[cls].append(slowdown)
            if cls == "small":
                small_times.append(took)
                if min(r["s"] for r in rs) < huge_end:
                    small_during.append(slowdown)
        out[name] = {
            "small_mean_slowdown_while_huge_runs": round(statistics.fmean(small_during), 2)
            if small_during
            else None,
            "max_slowdown": round(max(max(v) for v in slow.values()), 2),
            "small_p95_completion_s": round(pct(small_times, 95) or 0, 3),
            "mean_slowdown_by_class": {k: round(statistics.fmean(v), 2) for k, v in slow.items()},
            "uploads_by_class": {k: len(v) for k, v in slow.items()},
        }
    ours = out.get("jobstream", {}).get("small_p95_completion_s")
    return {
        "scenario": "fairness",
        "uploads": len(workload),
        "chunks": total,
        "unit_s": unit,
        "slots": slots,
        "systems": out,
        "small_p95_better_than": {
            name: round(v["small_p95_completion_s"] / ours, 2)
            for name, v in out.items()
            if name != "jobstream" and ours
        },
    }


# -- 5. ratelimit -------------------------------------------------------------------------


def window_stats(
    starts: Sequence[float], limit: int, window: float, span: float, skip: float = 0.0
) -> tuple[int, float]:
    """Violations (starts that make more than ``limit`` in some window of ``window`` s,
    sliding over every start) and utilisation over ``span`` s of starts beginning ``skip``
    s after the first."""
    a = sorted(starts)
    violations = sum(1 for i in range(len(a) - limit) if a[i + limit] - a[i] < window)
    if not a:
        return 0, 0.0
    begin = a[0] + skip
    used = sum(1 for x in a if begin <= x < begin + span)
    return violations, used / (limit * span / window)


def ratelimit(
    limit: int,
    window: float,
    seconds: float,
    tenants: int,
    slots: int,
    systems: Sequence[str],
    show: bool,
) -> Result:
    """Demand 10× a per-tenant limit (``limit`` per ``window`` s) for ``seconds``, all
    submitted at once (a backlog lasting 10 × ``seconds``); violations counted over every
    start (what the limited service sees) and, for jobstream, every admission (what its
    limit counts); utilisation over the second ``seconds``-long span after the first
    start, so taking in the burst (jobstream ingests ~1,000 submissions/s, and admission
    shares the process) is not what is measured."""
    per_tenant = int(10 * limit * seconds / window)
    out: dict[str, Any] = {}
    for name in systems:
        if name == "procrastinate":
            out[name] = {"supported": False, "note": "procrastinate has no rate limits"}
            continue
        # jobstream's starts come from two workers (half the slots each): the limit holds
        # across them
        two = {"workers": 2} if name == "jobstream" else {}
        per_worker = slots // 2 if two else slots
        with SYSTEMS[name](
            per_worker, rate=f"{limit}/{window:g}s", tenants=tenants, **two
        ) as system:
            jobs = [Job(f"r{t}-{i}", t=f"t{t}") for i in range(per_tenant) for t in range(tenants)]
            system.submit(jobs)
            # the limit holds the backlog for 10 × seconds; measure the second ``seconds``
            deadline = time.monotonic() + seconds + 30
            # the first job ended (by its own record, then in the system's state)
            while not system.completed() or not (timings := system.timings()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: no job started in {seconds + 30:g} s")
                time.sleep(0.2)
            first = min(r["a"] for r in timings)
            time.sleep(max(0.0, first + 2 * seconds + 2 - time.time()))
            timings = system.timings()
            log = system.admissions() if isinstance(system, Jobstream) else {}
        starts: dict[str, list[float]] = defaultdict(list)
        for r in timings:
            starts[r["t"]].append(r["a"])
        per = [window_stats(v, limit, window, seconds, seconds) for v in starts.values()]
        entry: dict[str, Any] = {
            "supported": True,
            "violations_at_start": sum(v for v, _ in per),
            "utilisation": round(statistics.fmean(u for _, u in per), 4) if per else 0.0,
        }
        if log:  # jobstream: what its limit counts, the admissions in the window log
            adm = [window_stats(v, limit, window, seconds, seconds) for v in log.values()]
            entry["violations_at_admission"] = sum(v for v, _ in adm)
            entry["utilisation_at_admission"] = round(statistics.fmean(u for _, u in adm), 4)
        out[name] = entry
    return {
        "scenario": "ratelimit",
        "limit": f"{limit}/{window:g}s per tenant",
        "tenants": tenants,
        "demand_per_tenant": per_tenant,
        "measured_s": seconds,
        "measured_from_s": seconds,
        "systems": out,
        "note": "jobstream: two workers of half the slots each; Celery: one task per tenant "
        "with rate_limit (it limits per task type and per worker, not per tenant)",
    }


# -- 6. delayed ---------------------------------------------------------------------------


def delayed(jobs: int, lead_s: float, slots: int, systems: Sequence[str], show: bool) -> Result:
    """``jobs`` no-op jobs all due at the same instant, submitted ``lead_s`` before it
    (jobstream ``run_at``, Celery ``eta``, procrastinate ``schedule_at``): how late each one
    starts after the instant (start lateness), and whether any started early."""
    out: dict[str, Any] = {}
    for name in systems:
        with SYSTEMS[name](slots) as system:
            system.submit([Job(f"warm{i}") for i in range(2 * slots)])  # pools started
            system.wait(2 * slots, show, "warm-up")
            due = time.time() + lead_s
            system.submit_at([Job(f"d{i}") for i in range(jobs)], due)
            submitted_by = time.time()
            system.wait(2 * slots + jobs, show, "delayed")
            late = [r["a"] - due for r in system.timings() if r["k"].startswith("d")]
        out[name] = {
            "lateness_p50_ms": ms(pct(late, 50)),
            "lateness_p99_ms": ms(pct(late, 99)),
            "lateness_max_ms": ms(max(late, default=None)),
            "early": sum(1 for x in late if x < 0),
            "submitted_before_due_s": round(due - submitted_by, 3),
        }
    return {
        "scenario": "delayed",
        "jobs": jobs,
        "slots": slots,
        "systems": out,
        "note": "lateness = start - the instant every job was due; the last jobs wait for "
        "the ones before them (slots), so p99 includes running the burst",
    }


# -- 7. scale -----------------------------------------------------------------------------


def scale(jobs: int, tenants: int, peer_jobs: int, systems: Sequence[str], show: bool) -> Result:
    """jobstream: the admission core with ``jobs`` queued over ``tenants`` (decisions/s,
    bytes per job). Peers: bytes per queued job in their own store with ``peer_jobs`` queued
    and no worker (Redis ``used_memory``; procrastinate's table and indexes)."""
    from bench.admission import bytes_per_job, decisions_per_s

    out: dict[str, Any] = {}
    if "jobstream" in systems:
        out["jobstream"] = {
            "queued": jobs,
            "decisions_per_s": decisions_per_s(jobs, tenants, constrained=False, repeats=3)[
                "per_s"
            ],
            "bytes_per_job": bytes_per_job(jobs, tenants),
        }
    if "celery" in systems:
        out["celery"] = _celery_bytes(peer_jobs, tenants)
    if "procrastinate" in systems:
        out["procrastinate"] = _procrastinate_bytes(peer_jobs, tenants)
    return {"scenario": "scale", "tenants": tenants, "systems": out}


def _celery_bytes(n: int, tenants: int) -> dict[str, Any]:
    import redis

    from bench.peers import celery_app
    from bench.systems import REDIS

    r = redis.Redis.from_url(f"{REDIS}/0")
    r.flushall()
    before = int(r.info("memory")["used_memory"])
    s = time.time()
    start = time.monotonic()
    for i in range(n):
        celery_app.noop.apply_async((f"q{i}", s, f"t{i % tenants}"))
    elapsed = time.monotonic() - start
    used = int(r.info("memory")["used_memory"]) - before
    r.flushall()
    return {
        "queued": n,
        "bytes_per_job": round(used / n, 1),
        "enqueue_per_s": round(n / elapsed),
    }


def _procrastinate_bytes(n: int, tenants: int) -> dict[str, Any]:
    import psycopg

    from bench.systems import defer_in_batches, procrastinate_database

    with procrastinate_database() as (dsn, app):
        s = time.time()
        start = time.monotonic()
        defer_in_batches(
            app, "noop", ({"k": f"q{j}", "s": s, "t": f"t{j % tenants}"} for j in range(n))
        )
        elapsed = time.monotonic() - start
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE procrastinate_jobs")
            row = conn.execute(
                "SELECT pg_total_relation_size('procrastinate_jobs')"
                " + pg_total_relation_size('procrastinate_events')"
            ).fetchone()
    used = int(row[0]) if row else 0
    return {
        "queued": n,
        "bytes_per_job": round(used / n, 1),
        "enqueue_per_s": round(n / elapsed),
    }


SCENARIOS: dict[str, Callable[..., Result]] = {
    "throughput": throughput,
    "latency": latency,
    "dag": dag,
    "fairness": fairness,
    "ratelimit": ratelimit,
    "delayed": delayed,
    "scale": scale,
}

__all__ = ["SCENARIOS", "Jobstream", "window_stats"]
