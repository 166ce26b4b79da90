"""The parts of ``jobstream demo``: what jobstream does, each shown on a small workload.

Each part submits its jobs (through the public ``JobPublisher``, on a thread: the scheduler
shares this event loop), waits until they have ended (a progress bar each) and returns what
happened, read back from PostgreSQL:

- ``burst``: independent no-op jobs over four tenants: jobs/s and submit→start percentiles;
- ``workflows``: FOSSology-shaped DAGs (unpack → three scanners → report), one of them with a
  broken upload: its unpack fails and its dependents fail with it as the root cause;
- ``fairness``: one tenant floods, three small tenants submit a few jobs right after: theirs
  finish while the flood goes on;
- ``rate_limit``: a tenant limited to 5 jobs a second submits 15 at once;
- ``time``: a job with ``delay_s`` and a schedule ticking every second;
- ``dead_letters``: malformed events, rejected with their reason (nothing is lost).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from rich.progress import Progress, TaskID

from agents.core.schedules import Cron, tick_job_id
from agents.core.stats import ms, pct
from agents.store import PostgresJobStore
from agents.store.schedules import ScheduleSpec
from streams.events import JobSpec
from streams.publisher import JobPublisher

TERMINAL = ("succeeded", "failed", "cancelled")
METERED_TENANT, METERED_LIMIT, METERED_WINDOW_S = "metered", 5, 1.0
BAD_EVENTS: list[bytes] = [
    b"{not json",
    b'{"type":"job.submitted","v":1,"job":{"id":"bad-type","tenant":"t","kind":"demo-noop",'
    b'"priority":"high"},"submitted_at":1}',
    b'{"type":"job.submitted","v":1,"job":{"id":"bad-kind","tenant":"t",'
    b'"kind":"no-such-kind"},"submitted_at":1}',
]


@dataclass
class Stage:
    """What every part uses: the publisher, the store, the progress display, the run's id."""

    pub: JobPublisher
    store: PostgresJobStore
    progress: Progress
    run: str
    ids: list[str] = field(default_factory=list)  # every job the story submitted

    async def submit(self, jobs: list[JobSpec]) -> None:
        self.ids += [j.id for j in jobs]
        for i in range(0, len(jobs), 1000):
            await asyncio.to_thread(self.pub.submit_many, jobs[i : i + 1000])

    async def ended(
        self, ids: list[str], what: str, timeout_s: float = 300.0
    ) -> list[dict[str, Any]]:
        """Wait (a progress bar) until every job of ``ids`` has ended; their rows."""
        task: TaskID = self.progress.add_task(what, total=len(ids))
        deadline = time.monotonic() + timeout_s
        while True:
            counts = await self.store.state_counts(ids)
            done = sum(counts.get(s, 0) for s in TERMINAL)
            self.progress.update(task, completed=done)
            if done >= len(ids):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {done} of {len(ids)} jobs ended in {timeout_s:.0f} s")
            await asyncio.sleep(0.05)
        return await self.store.job_times(ids)


async def burst(st: Stage, n: int) -> dict[str, Any]:
    tenants = ["acme", "globex", "initech", "umbrella"]
    jobs = [
        JobSpec(id=f"{st.run}-burst-{i}", tenant=tenants[i % 4], kind="demo-noop") for i in range(n)
    ]
    t0 = time.monotonic()
    await st.submit(jobs)
    rows = await st.ended([j.id for j in jobs], "burst")
    elapsed = time.monotonic() - t0
    to_start = [r["started"] - r["submitted"] for r in rows if r["started"]]
    return {
        "jobs": n,
        "succeeded": sum(r["state"] == "succeeded" for r in rows),
        "seconds": round(elapsed, 2),
        "jobs_per_s": round(n / elapsed, 1),
        "submit_to_start_ms": {"p50": ms(pct(to_start, 50)), "p99": ms(pct(to_start, 99))},
    }


def upload_workflow(run: str, k: int, broken: bool) -> tuple[str, list[JobSpec]]:
    wf = f"{run}-upload-{k}"
    unpack = JobSpec(
        id=f"{wf}-unpack",
        tenant="fossology",
        kind="demo-unpack",
        args={"upload": str(k), "broken": "yes" if broken else "no"},
    )
    scans = [
        JobSpec(
            id=f"{wf}-{agent}",
            tenant="fossology",
            kind="demo-scan",
            args={"upload": str(k), "agent": agent},
            depends_on=[unpack.id],
        )
        for agent in ("nomos", "monk", "copyright")
    ]
    report = JobSpec(
        id=f"{wf}-report",
        tenant="fossology",
        kind="demo-scan",
        args={"upload": str(k), "agent": "report"},
        depends_on=[s.id for s in scans],
    )
    return wf, [unpack, *scans, report]


async def workflows(st: Stage, n: int = 6, broken: int = 3) -> dict[str, Any]:
    flows = [upload_workflow(st.run, k, k == broken) for k in range(1, n + 1)]
    for wf, jobs in flows:
        st.ids += [j.id for j in jobs]
        await asyncio.to_thread(st.pub.submit_workflow, wf, jobs)
    rows = await st.ended([j.id for _, jobs in flows for j in jobs], "workflows")
    root = f"{st.run}-upload-{broken}-unpack"
    dependents = [r for r in rows if r["id"].startswith(f"{st.run}-upload-{broken}-")]
    dependents = [r for r in dependents if r["id"] != root]
    return {
        "workflows": n,
        "jobs": len(rows),
        "succeeded": sum(r["state"] == "succeeded" for r in rows),
        "failed": sum(r["state"] == "failed" for r in rows),
        "broken_unpack": root,
        "dependents": len(dependents),
        "dependents_failed_with_root_cause": sum(
            r["state"] == "failed" and r["root_cause"] == root for r in dependents
        ),
    }


async def fairness(st: Stage, flood: int = 160, small: int = 4) -> dict[str, Any]:
    big = [
        JobSpec(id=f"{st.run}-flood-{i}", tenant="bigcorp", kind="demo-work") for i in range(flood)
    ]
    few = [
        JobSpec(id=f"{st.run}-small-{t}-{i}", tenant=t, kind="demo-work")
        for t in ("alice", "bob", "carol")
        for i in range(small)
    ]
    await st.submit(big)
    await st.submit(few)
    rows = await st.ended([j.id for j in big + few], "fairness")
    first = min(r["submitted"] for r in rows)
    flood_done = max(r["finished"] for r in rows if r["tenant"] == "bigcorp") - first
    small_done = [r["finished"] - r["submitted"] for r in rows if r["tenant"] != "bigcorp"]
    return {
        "flood_jobs": flood,
        "flood_done_s": round(flood_done, 2),
        "small_jobs": len(few),
        "small_done_p95_s": round(pct(small_done, 95) or 0.0, 2),
        "small_done_mean_s": round(statistics.fmean(small_done), 2),
    }


def max_in_window(times: list[float], window: float) -> int:
    t = sorted(times)
    best, lo = 0, 0
    for hi in range(len(t)):
        while t[hi] - t[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def rate_limit(st: Stage, n: int = 15) -> dict[str, Any]:
    jobs = [
        JobSpec(id=f"{st.run}-metered-{i}", tenant="metered", kind="demo-noop") for i in range(n)
    ]
    since = time.time()
    await st.submit(jobs)
    rows = await st.ended([j.id for j in jobs], "rate limit")
    starts = [r["started"] for r in rows if r["started"]]
    admitted = await st.store.admissions(f"tenant:{METERED_TENANT}", since)
    return {
        "jobs": n,
        "limit": f"{METERED_LIMIT} per {METERED_WINDOW_S:g} s",
        "admitted_span_s": round(max(admitted) - min(admitted), 2),
        "max_admitted_in_a_window": max_in_window(admitted, METERED_WINDOW_S),
        "max_started_in_a_window": max_in_window(starts, METERED_WINDOW_S),
    }


async def timed(st: Stage, delay_s: float = 2.0, ticks: int = 3) -> dict[str, Any]:
    later = JobSpec(id=f"{st.run}-later", tenant="acme", kind="demo-noop", delay_s=delay_s)
    await st.submit([later])
    name = f"demo-{st.run}"
    spec = ScheduleSpec(
        "* * * * * *", "UTC", {"tenant": "acme", "kind": "demo-noop", "args": {}}, "all"
    )
    created = time.time()
    await st.store.put_schedule(name, spec, created)
    expect = [tick_job_id(name, t) for t in Cron("* * * * * *").ticks(created, created + ticks)]
    st.ids += expect
    try:
        rows = await st.ended([later.id, *expect], "time")
    finally:
        await st.store.remove_schedule(name)
    by_id = {r["id"]: r for r in rows}
    done = by_id[later.id]
    return {
        "delay_s": delay_s,
        "started_after_s": round(done["started"] - done["accepted"], 2),
        "schedule": "every second",
        "ticks": len(expect),
        "tick_jobs_succeeded": sum(by_id[i]["state"] == "succeeded" for i in expect),
    }


async def dead_letters(st: Stage, before: int) -> dict[str, Any]:
    for raw in BAD_EVENTS:
        await asyncio.to_thread(st.pub.send_raw, "jobs.independent", raw, b"bad")
    task = st.progress.add_task("dead letters", total=len(BAD_EVENTS))
    deadline = time.monotonic() + 60
    while (n := await st.store.dead_letter_count() - before) < len(BAD_EVENTS):
        st.progress.update(task, completed=n)
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    st.progress.update(task, completed=n)
    return {"malformed_events": len(BAD_EVENTS), "dead_lettered": n}


def told(parts: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Each part's result in a sentence."""
    out: list[tuple[str, str]] = []
    if b := parts.get("burst"):
        s = b["submit_to_start_ms"]
        out.append(
            (
                "burst",
                f"{b['jobs']:,} no-op jobs in {b['seconds']} s: {b['jobs_per_s']:,} jobs/s; "
                f"submit→start p50 {s['p50']} ms, p99 {s['p99']} ms",
            )
        )
    if w := parts.get("workflows"):
        out.append(
            (
                "workflows",
                f"{w['workflows']} FOSSology workflows ({w['jobs']} jobs): {w['succeeded']} "
                f"succeeded; a broken upload's unpack failed and "
                f"{w['dependents_failed_with_root_cause']} of its {w['dependents']} dependents "
                "failed with it as the root cause",
            )
        )
    if f := parts.get("fairness"):
        out.append(
            (
                "fairness",
                f"one tenant's {f['flood_jobs']} jobs took {f['flood_done_s']} s; three small "
                f"tenants' {f['small_jobs']} jobs, submitted after, were done within "
                f"{f['small_done_p95_s']} s (p95)",
            )
        )
    if r := parts.get("rate_limit"):
        out.append(
            (
                "rate limit",
                f"{r['jobs']} jobs of a tenant limited to {r['limit']} admitted over "
                f"{r['admitted_span_s']} s, at most {r['max_admitted_in_a_window']} in any "
                f"window ({r['max_started_in_a_window']} starts)",
            )
        )
    if t := parts.get("time"):
        out.append(
            (
                "time",
                f"a job with delay_s={t['delay_s']:g} started {t['started_after_s']} s after "
                f"acceptance; a schedule {t['schedule']}: {t['ticks']} ticks, "
                f"{t['tick_jobs_succeeded']} jobs",
            )
        )
    if d := parts.get("dead_letters"):
        out.append(
            (
                "dead letters",
                f"{d['malformed_events']} malformed events: {d['dead_lettered']} dead-lettered "
                "with their reason (jobstream deadletter list)",
            )
        )
    return out
