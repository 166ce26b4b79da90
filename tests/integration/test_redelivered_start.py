"""An attempt started again on another worker (its dispatch redelivered after the first
worker froze and its partition moved) belongs to that worker: the monitor's failure for the
frozen worker changes nothing and gives nothing back, against real PostgreSQL."""

from __future__ import annotations

import asyncio

import psycopg

from agents.store import PostgresJobStore
from agents.store.rows import Accepted
from streams.events import JobEvent, JobFailed, JobSpec, JobStarted


def _row(dsn: str) -> tuple[str, int, str | None, int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT j.state, j.attempt, j.worker, "
            "(SELECT count(*) FROM job_holds WHERE job_id = j.id), "
            "(SELECT used FROM semaphores WHERE name = 'licence') FROM jobs j WHERE id = 'a'"
        ).fetchone()
    assert row is not None
    return str(row[0]), int(row[1]), row[2], int(row[3]), int(row[4])


def _lost(worker: str) -> JobFailed:
    """The monitor's failure of attempt 1 after judging ``worker`` lost."""
    return JobFailed(
        job_id="a",
        attempt=1,
        worker=worker,
        at=10.0,
        error=f"worker {worker} lost",
        backoff=False,
        lost_worker=True,
    )


def test_a_lost_workers_failure_leaves_an_attempt_that_started_again_elsewhere(
    database_url: str,
) -> None:
    async def scenario() -> None:
        async with PostgresJobStore(database_url) as store:

            async def feed(*events: JobEvent) -> None:
                await store.settle_batch(
                    [], list(events), now=10.0, grace_s=60, allow_cross_tenant=False
                )

            await store.settle_batch(
                [Accepted(JobSpec(id="a", tenant="t", kind="k"), 0.0, 3, ("x", 0, 0))],
                [],
                now=0.0,
                grace_s=60,
                allow_cross_tenant=False,
            )
            with psycopg.connect(database_url) as conn:  # attempt 1 dispatched, holding
                conn.execute("UPDATE jobs SET state = 'dispatched', attempt = 1 WHERE id = 'a'")
                conn.execute(
                    "INSERT INTO semaphores (name, capacity, used) VALUES ('licence', 2, 1)"
                )
                conn.execute(
                    "INSERT INTO job_holds (job_id, attempt, name, amount) "
                    "VALUES ('a', 1, 'licence', 1)"
                )
            await feed(JobStarted(job_id="a", attempt=1, worker="frozen", at=1.0))
            assert _row(database_url) == ("running", 1, "frozen", 1, 1)
            # the partition moved: the next owner started the same attempt
            await feed(JobStarted(job_id="a", attempt=1, worker="live", at=8.0))
            assert _row(database_url) == ("running", 1, "live", 1, 1)
            # the monitor judged the frozen worker lost: nothing changes, nothing given back
            await feed(_lost("frozen"))
            assert _row(database_url) == ("running", 1, "live", 1, 1)
            # replayed, the first start moves nothing back
            await feed(JobStarted(job_id="a", attempt=1, worker="live", at=8.0))
            assert _row(database_url) == ("running", 1, "live", 1, 1)
            # the worker that runs it is lost too: the attempt ends, its hold given back
            await feed(_lost("live"))
            assert _row(database_url) == ("ready", 1, "live", 0, 0)

    asyncio.run(scenario())
