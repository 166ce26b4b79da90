"""The batched floor of the scheduler's hot path: the least the required work costs with the
design card's building blocks, with none of jobstream's logic (``python -m bench floor``'s
``pipeline`` comparison, beside jobstream's throughput in the same round).

The chain, as ``docs/performance.md`` describes it: a publisher submits no-op jobs at once
(``JobPublisher``, as the throughput bench does) → one bare consumer (confluent-kafka, no
asyncio) that, per fetch, inserts the new jobs already ``dispatched`` into a ``floor_jobs``
table with 5 secondary indexes (COPY), updates started and succeeded jobs (``UPDATE … FROM
unnest``), writes one history row per job and event (COPY), commits (fsync on), produces the
dispatches, waits for the broker, commits its offsets → a bare worker that answers each
dispatch with ``job.started`` and ``job.succeeded``. No validation, no dependencies, no
admission, no pool process: what remains is the records, the rows and the round trips.

Measured: jobs per second (first submission → last success recorded in PostgreSQL), and CPU
per job of the scheduler role, the worker role and the whole machine (``/proc/stat``).
The subprocess roles are this module's ``python -m bench.pipeline ROLE``.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
from confluent_kafka import Consumer, Producer
from rich.progress import Progress

from bench.harness import Run, cpu_s, machine_busy_s
from streams.events import (
    Dispatch,
    JobSpec,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    decode,
    encode,
    event_type,
)
from streams.kafka import client_config, producer_config
from streams.publisher import JobPublisher

JOBS = 20_000
_json = msgspec.json.Encoder()


def args(value: dict[str, Any]) -> str:
    return _json.encode(value).decode()


TABLES = """
CREATE TABLE floor_jobs (
    id text PRIMARY KEY, tenant text NOT NULL, kind text NOT NULL, state text NOT NULL,
    attempt int NOT NULL, args jsonb NOT NULL, submitted_at timestamptz NOT NULL,
    started_at timestamptz, finished_at timestamptz, worker text,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON floor_jobs (state);
CREATE INDEX ON floor_jobs (tenant, state);
CREATE INDEX ON floor_jobs (kind);
CREATE INDEX ON floor_jobs (submitted_at);
CREATE INDEX ON floor_jobs (updated_at);
CREATE TABLE floor_history (
    job_id text NOT NULL, event text NOT NULL, at timestamptz NOT NULL DEFAULT now());
"""


def _consumer(bootstrap: str, group: str, topics: list[str]) -> Consumer:
    c = Consumer(
        {
            **client_config(bootstrap, {}),
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    c.subscribe(topics)
    return c


def _fetch(consumer: Consumer, limit: int = 1000) -> list[Any]:
    """What is buffered, returning as soon as one message is there."""
    first = consumer.poll(0.1)
    if first is None:
        return []
    return [m for m in [first, *consumer.consume(limit - 1, 0)] if not m.error()]


def scheduler_role(
    bootstrap: str, intake: str, events: str, dispatch: str, dsn: str, group: str
) -> None:
    """The bare batched cycle (runs until killed)."""
    consumer = _consumer(bootstrap, group, [intake, events])
    producer = Producer(producer_config(bootstrap, {}, linger_ms=0))
    conn = psycopg.connect(dsn)
    while True:
        msgs = _fetch(consumer)
        if not msgs:
            continue
        new: list[JobSubmitted] = []
        started: list[JobStarted] = []
        succeeded: list[JobSucceeded] = []
        for m in msgs:
            value = m.value()
            kind = event_type(value)
            if kind == "job.submitted":
                new.append(decode(value, JobSubmitted))
            elif kind == "job.started":
                started.append(decode(value, JobStarted))
            elif kind == "job.succeeded":
                succeeded.append(decode(value, JobSucceeded))
        now = time.time()
        with conn.transaction(), conn.cursor() as cur:
            if new:
                with cur.copy(
                    "COPY floor_jobs (id, tenant, kind, state, attempt, args, submitted_at)"
                    " FROM STDIN"
                ) as copy:
                    for s in new:
                        j = s.job
                        at = datetime.fromtimestamp(s.submitted_at, UTC)
                        copy.write_row((j.id, j.tenant, j.kind, "dispatched", 1, args(j.args), at))
            if started:
                cur.execute(
                    "UPDATE floor_jobs j SET state = 'running', started_at = to_timestamp(v.at),"
                    " worker = v.w, updated_at = now() FROM unnest(%s::text[], %s::float8[],"
                    " %s::text[]) AS v(id, at, w) WHERE j.id = v.id AND j.state = 'dispatched'",
                    (
                        [e.job_id for e in started],
                        [e.at for e in started],
                        [e.worker for e in started],
                    ),
                )
            if succeeded:
                cur.execute(
                    "UPDATE floor_jobs j SET state = 'succeeded', finished_at = to_timestamp(v.at),"
                    " updated_at = now() FROM unnest(%s::text[], %s::float8[]) AS v(id, at)"
                    " WHERE j.id = v.id AND j.state IN ('dispatched', 'running')",
                    ([e.job_id for e in succeeded], [e.at for e in succeeded]),
                )
            with cur.copy("COPY floor_history (job_id, event) FROM STDIN") as copy:
                for s in new:
                    copy.write_row((s.job.id, "dispatched"))
                for e in started:
                    copy.write_row((e.job_id, "started"))
                for e in succeeded:
                    copy.write_row((e.job_id, "succeeded"))
        if new:
            records = [
                {
                    "value": encode(
                        Dispatch(
                            job_id=s.job.id,
                            attempt=1,
                            tenant=s.job.tenant,
                            kind=s.job.kind,
                            args=s.job.args,
                            timeout_s=None,
                            submitted_at=s.submitted_at,
                            dispatched_at=now,
                        )
                    ),
                    "key": s.job.id.encode(),
                }
                for s in new
            ]
            producer.produce_batch(dispatch, records)
            producer.flush(30)  # the dispatches are on the broker before the offsets move
        consumer.commit(asynchronous=True)


def worker_role(bootstrap: str, dispatch: str, events: str, group: str) -> None:
    """The bare worker: each dispatch answered with its start and its success."""
    consumer = _consumer(bootstrap, group, [dispatch])
    producer = Producer(producer_config(bootstrap, {}, linger_ms=0))
    me = f"floor-{os.getpid()}"
    while True:
        msgs = _fetch(consumer)
        if not msgs:
            continue
        out = []
        for m in msgs:
            d = decode(m.value(), Dispatch)
            key = d.job_id.encode()
            at = time.time()
            out.append(
                {
                    "value": encode(JobStarted(job_id=d.job_id, attempt=1, worker=me, at=at)),
                    "key": key,
                }
            )
            done = JobSucceeded(job_id=d.job_id, attempt=1, worker=me, at=time.time())
            out.append({"value": encode(done), "key": key})
        producer.produce_batch(events, out)
        producer.poll(0)
        consumer.commit(asynchronous=True)


def _succeeded(run: Run) -> int:
    return int(run.query("SELECT count(*) FROM floor_jobs WHERE state = 'succeeded'")[0][0])


def pipeline_floor(jobs: int, show: bool) -> dict[str, Any]:
    """The bare batched pipeline on ``jobs`` no-op jobs submitted at once."""
    with Run() as run:
        assert run.registry is not None
        name = run.registry.name
        intake, events, dispatch = (
            name("jobs.independent"),
            name("jobs.events"),
            name("jobs.dispatch"),
        )
        with psycopg.connect(run.dsn, autocommit=True) as conn:
            conn.execute(TABLES)  # type: ignore[arg-type]
        sched = run.spawn(
            "bench.pipeline",
            "scheduler",
            run.bootstrap,
            intake,
            events,
            dispatch,
            run.dsn,
            f"{run.name}.floor-scheduler",
        )
        worker = run.spawn(
            "bench.pipeline", "worker", run.bootstrap, dispatch, events, f"{run.name}.floor-worker"
        )
        with JobPublisher(run.bootstrap, registry=run.registry) as pub:
            # warm-up: the groups joined, every connection open; not measured
            deadline = time.monotonic() + 90
            warm = 0
            while _succeeded(run) < warm or warm == 0:
                pub.submit_many(
                    JobSpec(id=f"warm{warm + i}", tenant="t0", kind="pynoop") for i in range(12)
                )
                warm += 12
                time.sleep(1.0)
                if time.monotonic() > deadline:
                    raise RuntimeError("the pipeline floor did not answer within 90 s")
            time.sleep(1.0)
            base = _succeeded(run)
            cpu0 = {"scheduler": cpu_s(sched.pid), "worker": cpu_s(worker.pid)}
            machine0 = machine_busy_s()
            start = time.monotonic()
            pub.submit_many(
                JobSpec(id=f"n{i}", tenant=f"t{i % 8}", kind="pynoop") for i in range(jobs)
            )
            with Progress(disable=not show) as progress:
                task = progress.add_task("floor: bare batched pipeline", total=jobs)
                done = 0
                while done < jobs:
                    run.check_alive()
                    if time.monotonic() - start > 600:
                        raise RuntimeError(f"the pipeline floor finished {done} of {jobs} jobs")
                    time.sleep(0.05)
                    done = _succeeded(run) - base
                    progress.update(task, completed=done)
            elapsed = time.monotonic() - start
            machine = machine_busy_s() - machine0
            (history,) = run.query(
                "SELECT count(*) FROM floor_history WHERE job_id NOT LIKE 'warm%%'"
            )[0]
            cpu = {
                "scheduler": cpu_s(sched.pid) - cpu0["scheduler"],
                "worker": cpu_s(worker.pid) - cpu0["worker"],
            }
    return {
        "kind": "floor: bare batched pipeline",
        "jobs": jobs,
        "succeeded": done,
        "history_rows": int(history),
        "elapsed_s": round(elapsed, 2),
        "jobs_per_s": round(jobs / elapsed, 1),
        "scheduler_cpu_us_per_job": round(cpu["scheduler"] / jobs * 1e6, 1),
        "worker_cpu_us_per_job": round(cpu["worker"] / jobs * 1e6, 1),
        "machine_cpu_us_per_job": round(machine / jobs * 1e6, 1),
    }


def main(argv: list[str]) -> None:
    roles: dict[str, Any] = {"scheduler": scheduler_role, "worker": worker_role}
    roles[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
