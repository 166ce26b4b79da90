"""``python -m bench restarts [--json]``: how soon work resumes after PostgreSQL or the Kafka
broker is stopped and restarted under load.

A scheduler and a worker (8 slots) run on their own PostgreSQL (15434) and broker (19193),
started here with the repository's scripts and stopped afterwards, so the shared services
are never disturbed. A feeder (``bench.harness.Feeder``) submits short jobs at a steady rate,
sending a batch again while the broker is away, as an upstream service would. After a
steady stretch, one service is stopped for ``outage_s`` and started again; measured from the
moment it answers again:
- ``first_completion_s``: until the next job finishes;
- ``back_to_rate_s``: until completions per second are back to 90 % of the rate before the
  outage (the backlog of the outage drains faster than that rate);
- ``drained_s``: once the feeder stops (15 s after), until every submitted job has ended;
plus the invariant checker's verdict over the whole run (nothing lost, nothing twice).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from rich.progress import Progress

from agents.store.checks import check
from bench.harness import Feeder, Run
from bench.harness import service as run_script
from bench.workers import _wait_workers
from streams.events import JobSpec

PG_PORT, KAFKA_PORT = "15434", "19193"
ADMIN_DSN = f"postgresql://postgres@127.0.0.1:{PG_PORT}/postgres"
BOOTSTRAP = f"127.0.0.1:{KAFKA_PORT}"
KINDS = {"short": {"command": ["sleep", "0.02"], "timeout_s": 60, "max_attempts": 5}}
SCRIPTS = {
    "postgres": ("postgres.sh", {"PG_PORT": PG_PORT}),
    "kafka": ("kafka.sh", {"KAFKA_PORT": KAFKA_PORT}),
}


def service(name: str, action: str) -> None:
    script, env = SCRIPTS[name]
    run_script(script, action, **env)


def outage(target: str, outage_s: float, rate: float, show: bool) -> dict[str, Any]:
    settings = {
        "kinds": json.dumps(KINDS),
        "heartbeat_interval_s": "1",
        "worker_lost_after_s": "20",
        "reconcile_interval_s": "2",
        "reconcile_after_s": "5",
        "status_bind": "",
    }
    with Run(bootstrap=BOOTSTRAP, admin_dsn=ADMIN_DSN, **settings) as run:
        run.start("scheduler")
        run.start("worker", "--slots", "8")
        _wait_workers(run, 1)
        feeder = Feeder(run, rate, lambda i: JobSpec(id=f"r{i}", tenant=f"t{i % 3}", kind="short"))
        feeder.start()
        time.sleep(10)  # steady state
        stopped_at = time.time()
        service(target, "stop")
        time.sleep(outage_s)
        service(target, "start")  # returns once the service answers
        back_at = time.time()
        time.sleep(15)
        total = feeder.stop()
        drained = run.wait_finished(total, show, what=f"{target} restarted: jobs", limit_s=600)
        finished = sorted(
            float(r[0])
            for r in run.query(
                "SELECT extract(epoch from finished_at) FROM jobs WHERE finished_at IS NOT NULL"
            )
        )
        violations = check(run.dsn, settled=True, expect_dead_letters=0)
        (unfinished,) = run.query(
            "SELECT count(*) FROM jobs WHERE state NOT IN ('succeeded','failed','cancelled')"
        )[0]
        (accepted,) = run.query("SELECT count(*) FROM jobs")[0]
    before = [t for t in finished if stopped_at - 8 <= t < stopped_at]
    rate_before = len(before) / 8
    after = [t for t in finished if t >= back_at]
    first = after[0] - back_at if after else None
    back_to_rate = None
    for k in range(60):  # 1 s bins after the service is back
        n = sum(1 for t in after if back_at + k <= t < back_at + k + 1)
        if rate_before and n >= 0.9 * rate_before:
            back_to_rate = k + 1.0
            break
    return {
        "target": target,
        "outage_s": round(back_at - stopped_at, 1),
        "rate_before_per_s": round(rate_before, 1),
        "first_completion_s": None if first is None else round(first, 2),
        "back_to_rate_s": back_to_rate,
        "submitted": total,
        "accepted": int(accepted),
        "unfinished": int(unfinished),
        "violations": violations,
        "drained_s": round(drained, 1),
    }


def run(outage_s: float, rate: float, trials: int, show: bool) -> dict[str, Any]:
    service("postgres", "start")
    service("kafka", "start")
    results: list[dict[str, Any]] = []
    try:
        with Progress(disable=not show) as progress:
            task = progress.add_task("restarts", total=2 * trials)
            for _ in range(trials):
                for target in ("postgres", "kafka"):
                    results.append(outage(target, outage_s, rate, show=False))
                    progress.advance(task)
    finally:
        service("kafka", "stop")
        service("postgres", "stop")

    def summary(target: str) -> dict[str, Any]:
        mine = [r for r in results if r["target"] == target]
        firsts = [r["first_completion_s"] for r in mine if r["first_completion_s"] is not None]
        rates = [r["back_to_rate_s"] for r in mine if r["back_to_rate_s"] is not None]
        return {
            "first_completion_s_median": statistics.median(firsts) if firsts else None,
            "back_to_rate_s_median": statistics.median(rates) if rates else None,
            "lost": sum(r["submitted"] - r["accepted"] + r["unfinished"] for r in mine),
            "violations": sum(len(r["violations"]) for r in mine),
        }

    return {
        "scenario": "restarts",
        "outage_s": outage_s,
        "rate_per_s": rate,
        "trials": results,
        "postgres": summary("postgres"),
        "kafka": summary("kafka"),
    }
