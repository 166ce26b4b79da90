"""``python -m bench chaos [--faults N] [--json]`` (``make chaos``): faults injected into a
running system, then the invariant checker's verdict.

Two scheduler processes and three workers on real Kafka and PostgreSQL run a mixed workload
that keeps arriving while faults are injected every 0.5–2 s: independent jobs of four
tenants under a per-tenant rate limit (some of them seconds long), and FOSSology-shaped
workflows (unpack → four scanners → report) whose scanners share a licence server of
capacity 2. The faults (``bench.faults``): SIGKILL of workers and schedulers, a SIGKILL the
moment a worker's start is confirmed (before its commit), SIGTERM drains, workers frozen
shortly or past the liveness bound, workers whose wall clock is 30 s off, duplicated and
reordered lifecycle events, operators cancelling and retrying running jobs (also of a worker
being declared lost), and a log disk that fails. The first faults are one of each kind (in a
random order), so even a short run draws every kind; the rest are drawn at random.

Verdict (``agents/store/checks.py``): 0 jobs lost or unfinished, 0 double successes, no
dependency-order or rate-limit violation, semaphores balanced and free at the end; sampled
during the run, no job dispatched or running without a live owner beyond the liveness bound
plus a margin; from the scanners' own ledger, the licence server never held by more running
processes than its capacity (orphans of killed or frozen workers aside: docs/guarantees.md).
The settle time runs from the last fault to every job terminal; the jobs that ended last are
listed with the last error of their history (which fault kind held the time).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition
from rich.progress import Progress

from agents.pools import dispatch_partition
from agents.store.checks import check, owner_violations, process_overcommit
from bench.faults import FAULTS, Faults
from bench.harness import Run
from bench.workers import _wait_workers
from streams.events import JobSpec
from streams.publisher import JobPublisher

LEDGER_JOB = (
    'echo "+ $JOBSTREAM_JOB_ID $JOBSTREAM_ATTEMPT $PPID" >> "$1"; '
    'trap \'echo "- $JOBSTREAM_JOB_ID $JOBSTREAM_ATTEMPT $PPID" >> "$1"; exit 143\' TERM; '
    'sleep 0.2 & wait $!; echo "- $JOBSTREAM_JOB_ID $JOBSTREAM_ATTEMPT $PPID" >> "$1"'
)
KINDS = {
    "noop": {"command": ["true"], "timeout_s": 30, "max_attempts": 20},
    "short": {"command": ["sleep", "0.2"], "timeout_s": 30, "max_attempts": 20},
    "slow": {"command": ["sleep", "2"], "timeout_s": 30, "max_attempts": 20},
    "scan": {
        "command": ["sh", "-c", LEDGER_JOB, "sh", "{ledger}"],
        "timeout_s": 30,
        "max_attempts": 20,
        "resources": ["licence"],
    },
}
LICENCES = 2
LIMIT = {"scope": "tenant", "limit": 20, "window_s": 1.0}
SCANNERS = ["nomos", "monk", "ojo", "copyright"]
LOST_AFTER_S = 6.0
SCHEDULER_SESSION_S = 6.0
# beyond the liveness bound: a killed scheduler's partitions moving (its session), the
# monitor's tick and the failure's way through the dependency stage
OWNER_MARGIN_S = SCHEDULER_SESSION_S + 4.0


def workload(jobs: int, ledger: str) -> tuple[list[JobSpec], list[tuple[str, list[JobSpec]]]]:
    single = [
        JobSpec(
            id=f"i{i}",
            tenant=f"t{i % 4}",
            kind="slow" if i % 10 == 0 else "noop" if i % 3 else "short",
        )
        for i in range(jobs // 2)
    ]
    flows = []
    for u in range(max(1, jobs // 12)):

        def j(name: str, deps: list[str], u: int = u) -> JobSpec:
            scan = name in SCANNERS
            return JobSpec(
                id=f"u{u}-{name}",
                tenant=f"t{u % 4}",
                kind="scan" if scan else "short",
                args={"ledger": ledger} if scan else {},
                depends_on=[f"u{u}-{d}" for d in deps],
            )

        flows.append(
            (
                f"u{u}",
                [j("unpack", []), *(j(s, ["unpack"]) for s in SCANNERS), j("report", SCANNERS)],
            )
        )
    return single, flows


def _slices(items: list[Any], n: int) -> list[list[Any]]:
    """``items`` in ``n`` consecutive slices (the first ones larger by one)."""
    k, extra = divmod(len(items), n)
    out, at = [], 0
    for i in range(n):
        size = k + (1 if i < extra else 0)
        out.append(items[at : at + size])
        at += size
    return out


def run(faults: int, jobs: int, show: bool, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    injected: Counter[str] = Counter()
    settings = {
        "kinds": json.dumps(KINDS),
        "rate_limits": json.dumps([LIMIT]),
        "resources": json.dumps({"licence": LICENCES}),
        "heartbeat_interval_s": "1",
        "worker_lost_after_s": str(LOST_AFTER_S),
        "scheduler_session_timeout_s": str(SCHEDULER_SESSION_S),
        "reconcile_interval_s": "2",
        "reconcile_after_s": "5",
        "drain_grace_s": "5",
        "kill_grace_s": "2",
        "status_bind": "",
    }
    with Run(**settings) as run:
        ledger = Path(f"/tmp/{run.name}/ledger")
        ledger.parent.mkdir(parents=True, exist_ok=True)
        ledger.touch()
        single, flows = workload(jobs, str(ledger))
        total = len(single) + sum(len(f) for _, f in flows)
        pub = JobPublisher(run.bootstrap, registry=run.registry)
        reg = run.registry
        assert reg is not None
        base = reg.name("jobs.dispatch")  # the chaos kinds have no pool of their own

        def place(_kind: str, job_id: str) -> str:
            return f"{base}[{dispatch_partition(reg, job_id)}]"

        chaos = Faults(run, rng, pub, single, LOST_AFTER_S)
        _wait_workers(run, 3)
        time.sleep(4)
        # one of each kind first (a short run draws them all), then at random
        order = rng.sample(FAULTS, len(FAULTS))[:faults]
        order += [rng.choice(FAULTS) for _ in range(faults - len(order))]
        # the workload keeps arriving while the faults happen
        arrivals = list(zip(_slices(single, faults), _slices(flows, faults), strict=True))
        unowned: list[str] = []
        unjudged = 0  # owner samples skipped: heartbeats not recorded to their end
        ends = _HeartbeatEnds(run)
        last_fault = time.monotonic()
        times: list[tuple[str, float]] = []
        with Progress(disable=not show) as progress:
            task = progress.add_task("faults", total=faults)
            for fault, (some, flows_now) in zip(order, arrivals, strict=True):
                pub.submit_many(some)
                for wid, flow in flows_now:
                    pub.submit_workflow(wid, flow)
                time.sleep(rng.uniform(0.5, 2.0))
                chaos.inject(fault)
                injected[fault] += 1
                last_fault = time.monotonic()
                times.append((fault, last_fault))
                if ends.behind():  # the workers table is stale: ownership cannot be judged
                    unjudged += 1
                else:
                    unowned += owner_violations(run.dsn, LOST_AFTER_S + OWNER_MARGIN_S, place)
                run.check_alive()
                progress.update(task, advance=1)
        chaos.close()
        ends.close()
        pub.close()
        total += len(chaos.extra)
        with _LicenceWatch(run.dsn, last_fault) as watch:
            run.wait_finished(total, show, what="jobs after the faults", limit_s=600)
        settle_s = time.monotonic() - last_fault
        (unfinished,) = run.query(
            "SELECT count(*) FROM jobs WHERE state NOT IN ('succeeded','failed','cancelled')"
        )[0]
        (failed,) = run.query("SELECT count(*) FROM jobs WHERE state = 'failed'")[0]
        (accepted,) = run.query("SELECT count(*) FROM jobs")[0]
        limits = {f"tenant:t{i}": (LIMIT["limit"], LIMIT["window_s"]) for i in range(4)}
        violations = _settled_check(run.dsn, limits)
        violations += process_overcommit(ledger.read_text().splitlines(), LICENCES, chaos.orphaning)
        slowest = _slowest(run, time.monotonic() - last_fault)
    return {
        "scenario": "chaos",
        "faults_injected": dict(injected),
        "faults": sum(injected.values()),
        "jobs_submitted": total,
        "jobs_accepted": int(accepted),
        "lost": total - int(accepted) + int(unfinished),
        "failed": int(failed),
        "operator_commands": chaos.commands,
        "settle_s": round(settle_s, 1),
        "liveness_bound_s": LOST_AFTER_S,
        "last_fault": order[-1] if order else None,
        # the last faults, seconds before the last one
        "last_faults": [(f, round(t - last_fault, 1)) for f, t in times[-5:]],
        "slowest": slowest,
        # licence holders seen for 2 s or more while the run settled
        "licence_holders": [r for r in watch.seen if r["to_s"] - r["from_s"] >= 2.0][:20],
        "violations": violations,
        # sampled during the run: jobs without a live owner beyond the bound. Known open: a
        # dispatch can wait in Kafka longer than that across back-to-back rebalances (no
        # re-send or hand-back of dispatched jobs yet), so it is reported, and part of the
        # verdict, but kept apart from the invariants the short form asserts
        "unowned": sorted(set(unowned))[:20],
        "owner_samples_skipped": unjudged,
        "verdict": (
            "pass"
            if not violations and not unowned and total == accepted and not unfinished
            else "FAIL"
        ),
    }


def _settled_check(dsn: str, limits: dict[str, tuple[int, float]]) -> list[str]:
    """The checker once every job is terminal; holds of attempts whose end is still on its
    way (a cancelled attempt stopping) are given a few seconds to come back."""
    deadline = time.monotonic() + 2 * LOST_AFTER_S
    while True:
        violations = check(dsn, settled=True, limits=limits, expect_dead_letters=0)
        if not any("still holds" in v for v in violations) or time.monotonic() > deadline:
            return violations
        time.sleep(0.5)


class _HeartbeatEnds:
    """Whether the heartbeats agent has recorded every heartbeat partition to its end: while
    it has not (its scheduler was killed and the partitions wait for its session), the
    workers table is stale and the monitor judges no silent worker of those partitions, so
    neither does the sampled owner check."""

    def __init__(self, run: Run) -> None:
        assert run.registry is not None
        self.run = run
        self.topic = run.registry.name("workers.heartbeat")
        self.partitions = run.registry["workers.heartbeat"].partitions
        self.consumer = Consumer({"bootstrap.servers": run.bootstrap, "group.id": "chaos-ends"})

    def behind(self, wait_s: float = 2.0) -> bool:
        """True when the partitions' current ends are not recorded within ``wait_s`` (the
        agent records a heartbeat within milliseconds when it runs)."""
        ends = {
            p: self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, p), timeout=5.0, cached=False
            )[1]
            for p in range(self.partitions)
        }
        deadline = time.monotonic() + wait_s
        while True:
            recorded = dict(self.run.query("SELECT partition, next_offset FROM heartbeat_progress"))
            if all(recorded.get(p, 0) >= end for p, end in ends.items()):
                return False
            if time.monotonic() > deadline:
                return True
            time.sleep(0.2)

    def close(self) -> None:
        self.consumer.close()


class _LicenceWatch:
    """Samples, every half second while the run settles, which attempts hold the licence and
    whether each is the job's current attempt in flight: an attempt over that still holds it
    (kept for a dispatch that may still start, or a cancelled process still stopping) is what
    holds scanners back. ``seen``: each holder once, with when it was first and last seen
    (seconds after the last fault)."""

    def __init__(self, dsn: str, since: float) -> None:
        self.dsn, self.since = dsn, since
        self.seen: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _LicenceWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        at: dict[tuple[str, int], dict[str, Any]] = {}
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.wait(0.5):
                t = round(time.monotonic() - self.since, 1)
                for job, attempt, state, current in conn.execute(
                    "SELECT h.job_id, h.attempt, j.state, j.attempt FROM job_holds h "
                    "JOIN jobs j ON j.id = h.job_id WHERE h.name = 'licence'"
                ).fetchall():
                    row = at.get((job, attempt))
                    if row is None:
                        row = at[(job, attempt)] = {"job": job, "attempt": attempt, "from_s": t}
                        self.seen.append(row)
                    row.update(to_s=t, state=f"{state} (attempt {current})")


def _slowest(run: Run, since_last_fault_s: float, n: int = 5) -> list[dict[str, Any]]:
    """The jobs that ended last (by the database's clock: workers' clocks may be stepped),
    with their history, each event in seconds after the last fault (which stage held the
    settle time), and the last error it records."""
    rows = run.query(
        """WITH t AS (SELECT now() - make_interval(secs => %s) AS at)
           SELECT j.id, j.state, j.attempt,
                  (SELECT array_agg(h.event || ':' || h.attempt || '@'
                                    || round(extract(epoch from h.at - t.at)::numeric, 1)
                                    ORDER BY h.id)
                   FROM job_history h WHERE h.job_id = j.id),
                  (SELECT h.detail->>'error' FROM job_history h
                   WHERE h.job_id = j.id AND h.detail ? 'error' ORDER BY h.id DESC LIMIT 1),
                  (SELECT h.detail->>'reason' FROM job_history h
                   WHERE h.job_id = j.id AND h.event = 'cancelled' ORDER BY h.id DESC LIMIT 1),
                  round(extract(epoch from j.updated_at - t.at)::numeric, 1)::float8
           FROM jobs j, t WHERE j.state IN ('succeeded', 'failed', 'cancelled')
           ORDER BY j.updated_at DESC LIMIT %s""",
        since_last_fault_s,
        n,
    )
    return [
        {
            "job": jid,
            "state": state,
            "attempts": attempt,
            "after_last_fault_s": after,
            "history": history or [],
            "last_error": (error or reason or "")[:160],
        }
        for jid, state, attempt, history, error, reason, after in rows
    ]
