"""``python -m bench SCENARIO [--json] [--plot out.png]``.

Side by side with Celery and procrastinate (``bench/compare.py``; ``--small`` for the CI-sized
form, ``--systems`` to pick): ``throughput``, ``latency``, ``dag``, ``fairness``,
``ratelimit``, ``delayed``, ``scale``. jobstream alone: ``unlock`` (dependency-unlock
latency with the time per stage), ``admission``, ``workers``, ``metrics``, ``queries``,
``chaos``, ``soak``.
``floor``: the least the unlock path and a worker's job cost with the design's building
blocks and none of jobstream's logic, side by side with jobstream (``bench/floor.py``).

``unlock``: FOSSology-shaped workflows on real services.

Needs a Kafka broker and PostgreSQL (``make services`` starts both on loopback):
JOBSTREAM_KAFKA_BOOTSTRAP (default 127.0.0.1:19092) and JOBSTREAM_BENCH_PG (default
postgresql://postgres@127.0.0.1:15432/postgres). Starts the scheduler and one worker as
subprocesses in a fresh database and topic prefix, submits the workflows at once, and reports
workflow throughput and dependency-unlock latency: the last dependency finished → the
dependent started, from the times the worker recorded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import Run
from bench.workflow import steps
from streams.events import JobSpec
from streams.publisher import JobPublisher

ROOT = Path(__file__).resolve().parent.parent


def workflow(n: int) -> list[JobSpec]:
    return [
        JobSpec(
            id=f"u{n}-{name}",
            tenant=f"t{n % 4}",
            kind="noop",
            depends_on=[f"u{n}-{d}" for d in deps],
        )
        for name, deps in steps()
    ]


WARMUP = 5  # workflows shown apart in the unlock figures


def pct(values: list[float], q: int) -> float | None:
    from agents.core.stats import pct as nearest_rank

    p = nearest_rank(values, q)
    return None if p is None else round(p, 2)


def dag(
    uploads: int, slots: int, show: bool, interval: float = 0.0, trace: bool = False
) -> dict[str, Any]:
    """``trace``: the processes record per-job stage timestamps (``agents.trace``) and the
    result carries the unlock path stage by stage (``unlock_trace_ms``)."""
    total = uploads * 9
    trace_file = Path(tempfile.mkdtemp(prefix="jobstream-trace-")) / "stages.log" if trace else None
    with Run(**({"trace_file": str(trace_file)} if trace_file else {})) as run:
        run.start("scheduler")
        run.start("worker", "--slots", str(slots))
        time.sleep(8)  # consumer groups join; not what is measured
        assert run.registry is not None
        start = time.monotonic()
        with JobPublisher(run.bootstrap, registry=run.registry) as pub:
            for n in range(uploads):
                pub.submit_workflow(f"upload-{n}", workflow(n))
                if interval:
                    time.sleep(interval)
        run.wait_finished(total, show)
        elapsed = time.monotonic() - start
        by_job = {
            str(r[0]): float(r[1])
            for r in run.query(
                """SELECT j.id, extract(epoch from j.started_at - max(dj.finished_at)) * 1000
                   FROM jobs j JOIN job_deps d ON d.job_id = j.id JOIN jobs dj ON dj.id = d.dep_id
                   WHERE j.state = 'succeeded' GROUP BY j.id, j.started_at"""
            )
        }
        unlock = list(by_job.values())
        # the first workflows after a start meet cold caches (broker, server processes,
        # code paths): shown apart, never dropped from the figures above
        steady = [ms for job, ms in by_job.items() if int(job[1:].split("-")[0]) >= WARMUP]
        stages = run.query(
            """SELECT extract(epoch from j.ready_at - max(dj.finished_at)) * 1000,
                      extract(epoch from j.dispatched_at - j.ready_at) * 1000,
                      extract(epoch from j.started_at - j.dispatched_at) * 1000
               FROM jobs j JOIN job_deps d ON d.job_id = j.id JOIN jobs dj ON dj.id = d.dep_id
               WHERE j.state = 'succeeded'
               GROUP BY j.id, j.ready_at, j.dispatched_at, j.started_at"""
        )
        (wf_done,) = run.query(
            "SELECT count(*) FROM jobs WHERE id LIKE '%%-report' AND state = 'succeeded'"
        )[0]
        # the trace's unlock paths: each dependent and the dependency that finished last
        released_by = (
            dict(
                run.query(
                    """SELECT DISTINCT ON (d.job_id) d.job_id, d.dep_id
                       FROM job_deps d JOIN jobs dj ON dj.id = d.dep_id
                       ORDER BY d.job_id, dj.finished_at DESC"""
                )
            )
            if trace_file is not None
            else {}
        )
    out = {
        "scenario": "dag",
        "uploads": uploads,
        "jobs": total,
        "worker_slots": slots,
        "completed_workflows": int(wf_done),
        "elapsed_s": round(elapsed, 3),
        "workflows_per_s": round(int(wf_done) / elapsed, 2),
        "jobs_per_s": round(total / elapsed, 1),
        "unlock_latency_ms": {
            "p50": pct(unlock, 50),
            "p99": pct(unlock, 99),
            "samples": len(unlock),
            f"p99_after_first_{WARMUP}_workflows": pct(steady, 99),
        },
        # where the unlock time goes: completion → ready (dependency stage), ready →
        # dispatched (admission), dispatched → started (worker)
        "unlock_stages_p50_ms": {
            name: pct([float(r[i]) for r in stages], 50)
            for i, name in enumerate(["to_ready", "to_dispatched", "to_started"])
        },
    }
    if trace_file is not None:
        from bench.trace import slowest, unlock_stages

        out["unlock_trace_ms"] = unlock_stages(trace_file, released_by)
        out["slowest_unlocks_ms"] = slowest(trace_file, released_by)
        shutil.rmtree(trace_file.parent, ignore_errors=True)
    return out


COMPARED = ["throughput", "latency", "dag", "fairness", "ratelimit", "delayed", "scale"]
ALONE = [
    "unlock",
    "admission",
    "workers",
    "metrics",
    "queries",
    "chaos",
    "soak",
    "restarts",
    "floor",
]

# full size (the benchmark issue) and the CI-sized form (--small)
SIZES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "throughput": (
        {"jobs": 50_000, "rounds": 2, "slots": 8},
        {"jobs": 300, "rounds": 1, "slots": 8},
    ),
    "latency": (
        {"seconds": 10.0, "levels": (0.1, 0.5, 0.9), "probe": 2000, "slots": 8},
        {"seconds": 1.0, "levels": (0.1, 0.5, 0.9), "probe": 100, "slots": 8},
    ),
    "dag": ({"uploads": 1000, "rounds": 1, "slots": 8}, {"uploads": 10, "rounds": 1, "slots": 8}),
    "fairness": (
        {"uploads": 30, "huge_chunks": 240, "unit": 0.5, "slots": 4},
        {"uploads": 8, "huge_chunks": 16, "unit": 0.05, "slots": 4},
    ),
    "ratelimit": (
        {"limit": 20, "window": 1.0, "seconds": 10.0, "tenants": 4, "slots": 8},
        {"limit": 5, "window": 1.0, "seconds": 2.0, "tenants": 2, "slots": 8},
    ),
    "delayed": (
        {"jobs": 1000, "lead_s": 5.0, "slots": 8},
        {"jobs": 50, "lead_s": 3.0, "slots": 8},
    ),
    "scale": (
        {"jobs": 1_000_000, "tenants": 10_000, "peer_jobs": 100_000},
        {"jobs": 20_000, "tenants": 200, "peer_jobs": 1000},
    ),
}


def compared(args: argparse.Namespace) -> dict[str, Any]:
    from bench.compare import SCENARIOS

    full, small = SIZES[args.scenario]
    params = dict(small if args.small else full)
    for key in ("rounds", "uploads", "jobs"):
        value = args.rounds if key == "rounds" else getattr(args, f"c_{key}", None)
        if value is not None and key in params:
            params[key] = value
    systems = [s for s in args.systems.split(",") if s]
    return SCENARIOS[args.scenario](**params, systems=systems, show=not args.json)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("scenario", choices=COMPARED + ALONE)
    parser.add_argument("--small", action="store_true", help="the CI-sized form")
    parser.add_argument("--systems", default="jobstream,celery,procrastinate")
    parser.add_argument("--plot", type=Path, help="write a PNG here")
    parser.add_argument("--n", dest="c_jobs", type=int, help="throughput/scale: jobs")
    parser.add_argument("--workflows", dest="c_uploads", type=int, help="dag/fairness: uploads")
    parser.add_argument("--uploads", type=int, default=100)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument(
        "--interval",
        type=float,
        default=0.0,
        help="seconds between workflows (0: all at once, i.e. saturation)",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="dag/unlock: per-job stage timestamps, the unlock path stage by stage",
    )
    parser.add_argument("--jobs", type=int, default=100_000, help="admission: queued jobs")
    parser.add_argument("--tenants", type=int, default=1000, help="admission: tenants")
    parser.add_argument("--jobs-per-run", type=int, default=2000, help="workers: no-op jobs")
    parser.add_argument("--lost-after", type=float, default=6.0, help="workers: silence (s)")
    parser.add_argument("--trials", type=int, default=3, help="workers: recovery trials")
    parser.add_argument(
        "--dispatch",
        choices=("group", "share"),
        default="group",
        help="workers: how workers take dispatches (a consumer group or a share group)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (metrics, floor: 3)")
    parser.add_argument("--minutes", type=float, default=5.0, help="soak: duration")
    parser.add_argument("--rate", type=float, default=120.0, help="soak: jobs submitted per s")
    parser.add_argument("--faults", type=int, default=100, help="chaos: faults to inject")
    parser.add_argument("--rows", type=int, default=1_000_000, help="queries: jobs in the db")
    parser.add_argument("--outage", type=float, default=5.0, help="restarts: seconds down")
    parser.add_argument(
        "--restart-rate",
        dest="rate_restarts",
        type=float,
        default=40.0,
        help="restarts: jobs submitted per s",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.scenario in COMPARED:
        result = compared(args)
    elif args.scenario == "admission":
        from bench.admission import run

        result = run(args.jobs, args.tenants, show=not args.json)
    elif args.scenario == "soak":
        from bench.soak import run as run_soak

        result = run_soak(args.minutes, args.rate, show=not args.json)
    elif args.scenario == "restarts":
        from bench.restarts import run as run_restarts

        result = run_restarts(args.outage, args.rate_restarts, args.trials, show=not args.json)
    elif args.scenario == "chaos":
        from bench.chaos import run as run_chaos

        result = run_chaos(args.faults, args.jobs_per_run, show=not args.json)
    elif args.scenario == "queries":
        from bench.queries import run as run_queries

        result = run_queries(args.rows, show=not args.json)
    elif args.scenario == "metrics":
        from bench.metrics import run as run_metrics

        result = run_metrics(args.jobs_per_run, args.rounds or 3, show=not args.json)
    elif args.scenario == "floor":
        from bench.floor import run as run_floor

        result = run_floor(args.rounds or 3, show=not args.json)
    elif args.scenario == "workers":
        from bench.workers import run as run_workers

        result = run_workers(
            args.jobs_per_run,
            args.slots,
            args.lost_after,
            args.trials,
            show=not args.json,
            dispatch=args.dispatch,
        )
    else:
        result = dag(
            args.uploads, args.slots, show=not args.json, interval=args.interval, trace=args.trace
        )
    if args.plot:
        from bench.plots import plot

        plot(result, args.plot)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
