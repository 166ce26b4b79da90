"""``python -m bench soak [--minutes M] [--rate R] [--json]``: a bounded soak run.

The scheduler and two workers on real services, Python no-op jobs submitted at a steady
``rate`` per second (default 120/s, near this machine's measured saturation) for ``minutes``;
every 5 s it samples each process's resident memory (``/proc``), the backlog (jobs accepted and
not finished) and the throughput. Flat means: memory at the end within 20 % of memory after
the first minute (warm-up), and the backlog not growing over the second half.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.progress import Progress

from bench.harness import Feeder, Run
from bench.workers import KINDS, _wait_workers
from streams.events import JobSpec


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(minutes: float, rate: float, show: bool) -> dict[str, Any]:
    samples: list[dict[str, float]] = []
    with Run(heartbeat_interval_s="1", kinds=json.dumps(KINDS), status_bind="") as run:
        sched = run.start("scheduler")
        workers = [run.start("worker", "--slots", "8") for _ in range(2)]
        _wait_workers(run, 2)
        time.sleep(4)
        assert run.registry is not None
        feeder = Feeder(run, rate, lambda i: JobSpec(id=f"s{i}", tenant=f"t{i % 8}", kind="pynoop"))
        feeder.start()
        began = time.monotonic()
        last_done = 0
        with Progress(disable=not show) as progress:
            task = progress.add_task("soak", total=minutes * 60)
            while time.monotonic() - began < minutes * 60:
                time.sleep(5)
                (done,) = run.query(
                    "SELECT count(*) FROM jobs WHERE state IN ('succeeded','failed','cancelled')"
                )[0]
                (accepted,) = run.query("SELECT count(*) FROM jobs")[0]
                samples.append(
                    {
                        "t": round(time.monotonic() - began, 1),
                        "scheduler_mb": round(rss_mb(sched.pid), 1),
                        "workers_mb": round(sum(rss_mb(w.pid) for w in workers), 1),
                        "backlog": int(feeder.sent - done),
                        "unfinished_accepted": int(accepted - done),
                        "jobs_per_s": round((done - last_done) / 5, 1),
                    }
                )
                last_done = done
                progress.update(task, completed=time.monotonic() - began)
        submitted = feeder.stop()
    warm = next((s for s in samples if s["t"] >= 60), samples[len(samples) // 4])
    end = samples[-1]
    half = samples[len(samples) // 2 :]
    backlog_growth = half[-1]["backlog"] - half[0]["backlog"]
    return {
        "scenario": "soak",
        "minutes": minutes,
        "rate_per_s": rate,
        "submitted": submitted,
        "mean_jobs_per_s": round(sum(s["jobs_per_s"] for s in samples) / len(samples), 1),
        "scheduler_mb": {"after_warmup": warm["scheduler_mb"], "end": end["scheduler_mb"]},
        "workers_mb": {"after_warmup": warm["workers_mb"], "end": end["workers_mb"]},
        "backlog": {"second_half_start": half[0]["backlog"], "end": end["backlog"]},
        "memory_flat": end["scheduler_mb"] <= warm["scheduler_mb"] * 1.2
        and end["workers_mb"] <= warm["workers_mb"] * 1.2,
        "backlog_flat": backlog_growth <= rate * 5,
        "samples": samples,
    }
