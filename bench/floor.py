"""``python -m bench floor [--json]``: the floor under the open performance targets, side by
side with jobstream in one run.

A floor is the least the required work costs with the design card's building blocks on this
machine, with none of jobstream's logic around it:

- **worker** (target: ≤ 100 µs of worker CPU per no-op job). A bare loop, no asyncio, that
  does only what a worker must do for every job: fetch the dispatch (confluent-kafka), send
  ``job.started`` and wait for the broker's confirmation (the attempt is then the monitor's,
  the offset may be committed), run the job in a warm ``agents.pycall`` interpreter (one
  pipe write, one read), send the outcome, commit asynchronously. Same flood as
  ``bench workers``' worker-alone run (12,000 pooled no-ops straight to ``jobs.dispatch``, 8
  slots), CPU per job from /proc with idle subtracted, against the real worker.
- **unlock** (target: p50 ≤ 5 ms, p99 ≤ 25 ms). A bare chain with the least a dependency
  unlock needs: the finishing worker sends its completion (confluent-kafka, stamped just
  before the send) → a faust-streaming agent (the scheduler's stream library) records it
  durably in PostgreSQL (one autocommitted ``UPDATE``, fsync on: the dependency state and the
  admission in one statement, one round trip) → sends the dispatch (confluent-kafka,
  ``linger.ms`` 0) → a bare consumer stamps the start. One completion every ``1 / rate`` s
  (evenly: the easiest load), against ``bench unlock``'s light load (40 FOSSology-shaped
  uploads 0.25 s apart: ~32 unlocks per second).

- **pipeline** (target: jobstream ≥ 0.5 of it). The scheduler's hot path with none of its
  logic, batched: ``bench.pipeline`` (submissions → one bare consumer per fetch: COPY, UPDATE
  … FROM unnest, history, COMMIT, dispatches → a bare worker answering started + succeeded),
  beside jobstream's scheduler and one worker on the same number of no-ops.

Each floor runs in the same period as the real thing (interleaved rounds), so the machine's
noise moves both alike. The subprocess roles are this module's ``python -m bench.floor ROLE``.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer
from rich.progress import Progress

from bench.harness import ROOT, Run
from streams.events import Dispatch, JobStarted, JobSucceeded, decode, encode
from streams.kafka import client_config, producer_config

FLOOD_JOBS = 12_000
SLOTS = 8
UNLOCKS = 320
UNLOCK_RATE = 32.0  # per second: bench unlock's light load (320 unlocks in ~10 s)


def _consumer(bootstrap: str, group: str) -> Consumer:
    """A consumer of dispatches as the worker makes it (``DISPATCH_CONSUMER``)."""
    from agents.worker import DISPATCH_CONSUMER

    return Consumer({**client_config(bootstrap, {}), **DISPATCH_CONSUMER, "group.id": group})


# -- roles (subprocesses) ------------------------------------------------------------------


def worker_role(
    bootstrap: str, dispatch_topic: str, events_topic: str, group: str, logs: str
) -> None:
    """The bare worker loop (runs until killed)."""
    consumer = _consumer(bootstrap, group)
    producer = Producer(producer_config(bootstrap, {}, linger_ms=0))
    consumer.subscribe([dispatch_topic])
    me = f"floor-{os.getpid()}"
    members: list[subprocess.Popen[bytes]] = [
        subprocess.Popen(
            [sys.executable, "-m", "agents.pycall", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,
        )
        for _ in range(SLOTS)
    ]
    free = list(range(SLOTS))
    busy: dict[int, tuple[int, Dispatch]] = {}  # reply fd -> (member, dispatch)
    unconfirmed = 0

    def confirmed(_err: Any, _msg: Any) -> None:
        nonlocal unconfirmed
        unconfirmed -= 1

    def event(d: Dispatch, ev: Any) -> dict[str, bytes]:
        return {"value": encode(ev), "key": (d.group or d.job_id).encode()}

    while True:
        if free:
            msgs = consumer.consume(len(free), 0 if busy else 0.05)
            if msgs:
                batch = [decode(m.value(), Dispatch) for m in msgs if not m.error()]
                at = time.time()
                starts = [
                    event(d, JobStarted(job_id=d.job_id, attempt=d.attempt, worker=me, at=at))
                    for d in batch
                ]
                unconfirmed += len(starts)
                producer.produce_batch(events_topic, starts, on_delivery=confirmed)
                while unconfirmed > 0:  # the starts are on the broker before the jobs run
                    producer.poll(0.01)
                for d in batch:
                    i = free.pop()
                    request = {
                        "entrypoint": "bench.jobs:noop",
                        "args": d.args,
                        "log": f"{logs}/{d.job_id}.{d.attempt}.log",
                        "env": {"JOBSTREAM_JOB_ID": d.job_id},
                        "cwd": None,
                    }
                    stdin, stdout = members[i].stdin, members[i].stdout
                    assert stdin is not None and stdout is not None
                    os.write(stdin.fileno(), json.dumps(request).encode() + b"\n")
                    busy[stdout.fileno()] = (i, d)
                consumer.commit(asynchronous=True)
        if busy:
            readable, _, _ = select.select(list(busy), [], [], 0.01)
            outcomes = []
            for fd in readable:
                os.read(fd, 4096)
                i, d = busy.pop(fd)
                free.append(i)
                done = JobSucceeded(job_id=d.job_id, attempt=d.attempt, worker=me, at=time.time())
                outcomes.append(event(d, done))
            if outcomes:
                unconfirmed += len(outcomes)
                producer.produce_batch(events_topic, outcomes, on_delivery=confirmed)
        producer.poll(0)


def scheduler_role(
    bootstrap: str, events_topic: str, dispatch_topic: str, dsn: str, app_id: str
) -> None:
    """A faust agent: completion → one durable transaction → dispatch (runs until killed)."""
    import faust

    from agents.scheduler.app import faust_app

    app = faust_app(app_id, bootstrap)
    completions = app.topic(events_topic, value_type=bytes, key_type=bytes)
    producer = Producer(producer_config(bootstrap, {}, linger_ms=0))

    @app.agent(completions)
    async def unlock(stream: Any) -> None:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async for value in stream:
            body = json.loads(value)
            # the least durable record: one statement, committed (fsync) in its round trip
            await conn.execute(
                "UPDATE floor_jobs SET state = 'succeeded', at = now() WHERE id = %s",
                (body["id"],),
            )
            producer.produce(dispatch_topic, value, key=body["id"].encode())
            producer.poll(0)

    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


def starter_role(bootstrap: str, dispatch_topic: str, group: str, out: str) -> None:
    """A bare consumer: each dispatch's latency since its completion, one line per unlock."""
    consumer = _consumer(bootstrap, group)
    consumer.subscribe([dispatch_topic])
    with open(out, "a", buffering=1) as f:
        while True:
            m = consumer.poll(0.05)
            if m is not None and not m.error():
                now = time.time()
                f.write(f"{(now - json.loads(m.value() or b'{}')['finished']) * 1000:.3f}\n")


# -- the two comparisons -------------------------------------------------------------------


def worker_floor(show: bool, jobs: int = FLOOD_JOBS) -> dict[str, Any]:
    """The bare worker loop under the worker-alone run's flood (``bench.workers.flood``): CPU
    per job, idle subtracted. ``logs_written``: the jobs' log files (each job ran in a pool
    interpreter)."""
    from bench.workers import flood, result

    with Run() as run:
        assert run.registry is not None
        dispatch, events = run.registry.name("jobs.dispatch"), run.registry.name("jobs.events")
        logs = Path(f"/tmp/{run.name}/floor-job-logs")
        logs.mkdir(parents=True)
        group = f"{run.name}.floor"
        role = run.spawn("bench.floor", "worker", run.bootstrap, dispatch, events, group, str(logs))
        done, elapsed, cpu, idle = flood(
            run, [role], jobs, "pynoop", "floor: bare worker loop", show
        )
        written = sum(1 for _ in logs.iterdir())
    out = result("pynoop", 1, SLOTS, jobs, done, elapsed, cpu, idle)
    out["kind"] = "floor: bare worker loop"
    out["logs_written"] = written
    return out


def unlock_floor(unlocks: int, rate: float, show: bool) -> dict[str, Any]:
    """The bare unlock chain at ``rate`` unlocks per second: latency p50/p99."""
    from bench.__main__ import pct

    with Run() as run:
        assert run.registry is not None
        events, dispatch = run.registry.name("jobs.events"), run.registry.name("jobs.dispatch")
        ids = [f"f{i}" for i in range(unlocks)]
        with psycopg.connect(run.dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE floor_jobs (id text PRIMARY KEY, state text NOT NULL, at timestamptz)"
            )
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO floor_jobs (id, state) VALUES (%s, 'waiting')", [(i,) for i in ids]
                )
        out = Path(f"/tmp/{run.name}/floor-unlocks.txt")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
        app_id = f"{run.name}-floor"
        run.spawn("bench.floor", "scheduler", run.bootstrap, events, dispatch, run.dsn, app_id)
        starters = f"{run.name}.starter"
        run.spawn("bench.floor", "starter", run.bootstrap, dispatch, starters, str(out))
        producer = Producer(producer_config(run.bootstrap, {}, linger_ms=0))
        _warm(producer, events, run.registry["jobs.events"].partitions, out)
        before = len(out.read_text().splitlines())
        gap = 1.0 / rate
        with Progress(disable=not show) as progress:
            task = progress.add_task("floor: bare unlock chain", total=unlocks)
            due = time.monotonic()
            for n, job in enumerate(ids):
                due += gap
                time.sleep(max(0.0, due - time.monotonic()))
                body = json.dumps({"id": job, "finished": time.time()}).encode()
                producer.produce(events, body, key=f"upload-{n // 8}".encode())
                producer.poll(0)
                progress.update(task, completed=n + 1)
            producer.flush(30)
            deadline = time.monotonic() + 60
            while len(out.read_text().splitlines()) < before + unlocks:
                if time.monotonic() > deadline:
                    raise RuntimeError("the floor's unlock chain did not deliver every unlock")
                time.sleep(0.1)
        samples = [float(x) for x in out.read_text().splitlines()[before:]]
        (durable,) = run.query("SELECT count(*) FROM floor_jobs WHERE state = 'succeeded'")[0]
    return {
        "unlocks": unlocks,
        "rate_per_s": rate,
        "recorded_in_postgres": int(durable),
        "unlock_latency_ms": {
            "p50": pct(samples, 50),
            "p99": pct(samples, 99),
            "samples": len(samples),
            # as jobstream's figure after its first 5 workflows (8 unlocks each)
            "p99_after_first_40": pct(samples[40:], 99),
        },
    }


def _warm(producer: Producer, topic: str, partitions: int, out: Path, limit_s: float = 90) -> None:
    """Until a warm-up completion on every partition came through (the agent's group joined,
    every partition fetched once, the connection open): measured running, not starting."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for p in range(partitions):
            body = json.dumps({"id": "warm-up", "finished": time.time()}).encode()
            producer.produce(topic, body, key=b"warm-up", partition=p)
        producer.flush(10)
        time.sleep(1.0)
        if len(out.read_text().splitlines()) >= partitions:
            return
        out.write_text("")
    raise RuntimeError(f"the floor's unlock chain did not answer within {limit_s:.0f} s")


def run(rounds: int, show: bool) -> dict[str, Any]:
    """``rounds`` interleaved pairs of each comparison."""
    from bench.__main__ import dag
    from bench.pipeline import JOBS, pipeline_floor
    from bench.workers import throughput, worker_only

    worker_pairs, unlock_pairs, pipeline_pairs = [], [], []
    for _ in range(rounds):
        pipeline_pairs.append(
            {
                "jobstream": throughput(1, JOBS, SLOTS, "pynoop", show),
                "floor": pipeline_floor(JOBS, show),
            }
        )
        worker_pairs.append(
            {
                "jobstream_worker": worker_only(1, FLOOD_JOBS, SLOTS, "pynoop", show),
                "floor": worker_floor(show),
            }
        )
        real = dag(40, SLOTS, show, interval=0.25)
        unlock_pairs.append(
            {
                "jobstream": {"unlock_latency_ms": real["unlock_latency_ms"]},
                "floor": unlock_floor(UNLOCKS, UNLOCK_RATE, show),
            }
        )
        if show:
            last = {"pipeline": pipeline_pairs[-1], "worker": worker_pairs[-1]}
            print(json.dumps({**last, "unlock": unlock_pairs[-1]}))

    def worker_us(key: str) -> list[float]:
        return [p[key]["worker_cpu_us_per_job_minus_idle"] for p in worker_pairs]

    def unlock_ms(key: str, q: str) -> list[float]:
        return [p[key]["unlock_latency_ms"][q] for p in unlock_pairs]

    steady = {"jobstream": "p99_after_first_5_workflows", "floor": "p99_after_first_40"}

    def pipeline(key: str, what: str) -> float:
        return median(p[key][what] for p in pipeline_pairs)

    jobstream_rate, floor_rate = (
        pipeline("jobstream", "jobs_per_s"),
        pipeline("floor", "jobs_per_s"),
    )

    return {
        "scenario": "floor",
        "rounds": rounds,
        "pipeline": {
            "jobs": JOBS,
            "jobstream_jobs_per_s_median": jobstream_rate,
            "floor_jobs_per_s_median": floor_rate,
            "jobstream_vs_floor": round(jobstream_rate / floor_rate, 3),
            "jobstream_scheduler_us_per_job_median": pipeline(
                "jobstream", "scheduler_cpu_us_per_job"
            ),
            "floor_scheduler_us_per_job_median": pipeline("floor", "scheduler_cpu_us_per_job"),
            "pairs": pipeline_pairs,
        },
        "worker": {
            "target_us_per_job": 100,
            "jobstream_us_per_job_median": median(worker_us("jobstream_worker")),
            "floor_us_per_job_median": median(worker_us("floor")),
            "pairs": worker_pairs,
        },
        "unlock": {
            "target_ms": {"p50": 5, "p99": 25},
            "jobstream_p50_ms_median": median(unlock_ms("jobstream", "p50")),
            "floor_p50_ms_median": median(unlock_ms("floor", "p50")),
            "jobstream_p99_ms_median": median(unlock_ms("jobstream", "p99")),
            "floor_p99_ms_median": median(unlock_ms("floor", "p99")),
            "jobstream_p99_warm_ms_median": median(unlock_ms("jobstream", steady["jobstream"])),
            "floor_p99_warm_ms_median": median(unlock_ms("floor", steady["floor"])),
            "pairs": unlock_pairs,
        },
    }


def main(argv: list[str]) -> None:
    roles: dict[str, Any] = {
        "worker": worker_role,
        "scheduler": scheduler_role,
        "starter": starter_role,
    }
    roles[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
