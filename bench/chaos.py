"""``python -m bench chaos [--faults N] [--json]`` (``make chaos``): faults injected into a
running system, then the invariant checker's verdict.

Two scheduler processes and three workers on real Kafka and PostgreSQL run a mixed workload
(independent jobs of several tenants under a per-tenant rate limit, FOSSology-shaped
workflows with dependencies) while faults are injected every 0.5–2 s, each one of:
- ``kill_worker`` / ``kill_scheduler``: SIGKILL, then a new process;
- ``term_worker``: SIGTERM (drain), then a new process;
- ``stop_worker``: SIGSTOP for 3 s (a frozen host, shorter than the silence that makes it
  lost);
- ``stall_worker``: SIGSTOP for 10 s, past ``worker_lost_after_s`` and the consumer session:
  a slow consumer, its partitions move in a rebalance and its jobs are retried elsewhere;
  when it continues, what it reports for those attempts is fenced off;
- ``clock_step``: a worker replaced by one whose wall clock is 30 s behind or ahead
  (libfaketime, ``scripts/faketime.sh``; monotonic time untouched, like an NTP step);
- ``duplicate_events``: 20 lifecycle events already delivered are published again, and 20
  submissions sent again;
- ``reorder_events``: the last 20 lifecycle events published again in reverse order (a
  success before its start, a late failure after a retry's success). After the last fault, the run
waits for every job to end and checks (``agents/invariants.py``): 0 jobs left unfinished,
0 double successes, 0 dependency-order or rate-limit violations, semaphores balanced.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections import Counter, deque
from typing import Any

from confluent_kafka import Consumer
from rich.progress import Progress

from agents.invariants import check
from bench.harness import ROOT, Run, stop_process
from bench.workers import _wait_workers
from streams.events import JobSpec
from streams.publisher import JobPublisher

FAULTS = [
    "kill_worker",
    "kill_scheduler",
    "term_worker",
    "stop_worker",
    "stall_worker",
    "clock_step",
    "duplicate_events",
    "reorder_events",
]

KINDS = {
    "noop": {"command": ["true"], "timeout_s": 30, "max_attempts": 20},
    "short": {"command": ["sleep", "0.2"], "timeout_s": 30, "max_attempts": 20},
}
LIMIT = {"scope": "tenant", "limit": 20, "window_s": 1.0}
SCANNERS = ["nomos", "monk", "ojo", "copyright"]


def workload(jobs: int) -> tuple[list[JobSpec], list[tuple[str, list[JobSpec]]]]:
    single = [
        JobSpec(id=f"i{i}", tenant=f"t{i % 4}", kind="noop" if i % 3 else "short")
        for i in range(jobs // 2)
    ]
    flows = []
    for u in range(max(1, jobs // 12)):

        def j(name: str, deps: list[str], u: int = u) -> JobSpec:
            return JobSpec(
                id=f"u{u}-{name}",
                tenant=f"t{u % 4}",
                kind="short",
                depends_on=[f"u{u}-{d}" for d in deps],
            )

        flows.append(
            (
                f"u{u}",
                [j("unpack", []), *(j(s, ["unpack"]) for s in SCANNERS), j("report", SCANNERS)],
            )
        )
    return single, flows


def run(faults: int, jobs: int, show: bool, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    injected: Counter[str] = Counter()
    settings = {
        "kinds": json.dumps(KINDS),
        "rate_limits": json.dumps([LIMIT]),
        "heartbeat_interval_s": "1",
        "worker_lost_after_s": "6",
        "reconcile_interval_s": "2",
        "reconcile_after_s": "5",
        "drain_grace_s": "5",
        "status_bind": "",
    }
    with Run(**settings) as run:
        schedulers = [run.start("scheduler") for _ in range(2)]
        workers = [run.start("worker", "--slots", "4") for _ in range(3)]
        _wait_workers(run, 3)
        time.sleep(4)
        single, flows = workload(jobs)
        total = len(single) + sum(len(f) for _, f in flows)
        assert run.registry is not None
        faketime = subprocess.run(
            [str(ROOT / "scripts" / "faketime.sh")], capture_output=True, text=True, check=True
        ).stdout.strip()
        seen = Consumer(
            {
                "bootstrap.servers": run.bootstrap,
                "group.id": f"{run.name}.chaos",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        seen.subscribe([run.registry.name("jobs.events")])
        recent: deque[tuple[bytes | None, bytes]] = deque(maxlen=200)
        pub = JobPublisher(run.bootstrap, registry=run.registry)
        pub.submit_many(single)
        for wid, flow in flows:
            pub.submit_workflow(wid, flow)
        with Progress(disable=not show) as progress:
            task = progress.add_task("faults", total=faults)
            for _ in range(faults):
                time.sleep(rng.uniform(0.5, 2.0))
                for m in seen.consume(1000, 0):
                    if not m.error() and m.value():
                        recent.append((m.key(), m.value()))
                fault = rng.choice(FAULTS)
                injected[fault] += 1
                if fault in ("duplicate_events", "reorder_events"):
                    if fault == "duplicate_events":
                        again = rng.sample(recent, min(20, len(recent)))
                        pub.submit_many(rng.sample(single, min(20, len(single))))
                    else:
                        again = list(reversed(recent))[:20]
                    for key, value in again:
                        pub.send_raw("jobs.events", value, key)
                elif fault == "kill_scheduler":
                    victim = rng.choice(schedulers)
                    victim.send_signal(signal.SIGKILL)
                    victim.wait(30)
                    schedulers[schedulers.index(victim)] = run.start("scheduler")
                else:
                    victim = rng.choice(workers)
                    if fault in ("stop_worker", "stall_worker"):
                        victim.send_signal(signal.SIGSTOP)
                        time.sleep(3 if fault == "stop_worker" else 10)
                        victim.send_signal(signal.SIGCONT)
                    elif fault == "clock_step":
                        stop_process(victim, 30)
                        step = rng.choice(["-30", "+30"])
                        workers[workers.index(victim)] = run.start(
                            "worker",
                            "--slots",
                            "4",
                            env={
                                "LD_PRELOAD": faketime,
                                "FAKETIME": step,
                                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                            },
                        )
                    else:
                        sig = signal.SIGKILL if fault == "kill_worker" else signal.SIGTERM
                        victim.send_signal(sig)
                        stop_process(victim, 30)
                        workers[workers.index(victim)] = run.start("worker", "--slots", "4")
                progress.update(task, advance=1)
        pub.close()
        seen.close()
        elapsed = run.wait_finished(total, show, what="jobs after the faults", limit_s=600)
        (unfinished,) = run.query(
            "SELECT count(*) FROM jobs WHERE state NOT IN ('succeeded','failed','cancelled')"
        )[0]
        (failed,) = run.query("SELECT count(*) FROM jobs WHERE state = 'failed'")[0]
        (accepted,) = run.query("SELECT count(*) FROM jobs")[0]
        limits = {f"tenant:t{i}": (LIMIT["limit"], LIMIT["window_s"]) for i in range(4)}
        violations = check(run.dsn, settled=True, limits=limits, expect_dead_letters=0)
    return {
        "scenario": "chaos",
        "faults_injected": dict(injected),
        "faults": sum(injected.values()),
        "jobs_submitted": total,
        "jobs_accepted": int(accepted),
        "lost": total - int(accepted) + int(unfinished),
        "failed": int(failed),
        "settle_s": round(elapsed, 1),
        "violations": violations,
        "verdict": "pass" if not violations and total == accepted and not unfinished else "FAIL",
    }
