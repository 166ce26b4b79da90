"""Cancels and retries against real PostgreSQL (``agents.store.commands``): in their order on the
topic, exactly once per offset, a cancel aimed at an attempt only while it is in flight."""

from __future__ import annotations

import asyncio

import psycopg

from agents.store import PostgresJobStore
from agents.store.commands import JobCommand
from agents.store.rows import Accepted
from streams.events import JobSpec

TOPIC = "t.jobs.control"


def _cmd(offset: int, action: str, job: str, attempt: int | None = None) -> JobCommand:
    return JobCommand(TOPIC, 0, offset, action, job, attempt=attempt, by="test")  # type: ignore[arg-type]


def _state(dsn: str, job: str) -> tuple[str, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT state, attempt FROM jobs WHERE id = %s", (job,)).fetchone()
    assert row is not None
    return str(row[0]), int(row[1])


def test_commands_apply_in_order_exactly_once(database_url: str) -> None:
    async def scenario() -> None:
        async with PostgresJobStore(database_url) as store:
            await store.settle_batch(
                [Accepted(JobSpec(id="a", tenant="t", kind="k"), 0.0, 3, ("x", 0, 0))],
                [],
                now=0.0,
                grace_s=60,
                allow_cross_tenant=False,
            )
            with psycopg.connect(database_url) as conn:  # dispatched, attempt 1 in flight
                conn.execute("UPDATE jobs SET state = 'running', attempt = 1 WHERE id = 'a'")

            def apply(*cmds: JobCommand):  # type: ignore[no-untyped-def]
                return store.apply_job_commands(cmds, now=0.0, grace_s=60, allow_cross_tenant=False)

            # cancel then retry in one batch: retried (the cancel named the running attempt)
            done = await apply(_cmd(5, "cancel", "a"), _cmd(6, "retry", "a"))
            assert [(c.job, c.attempt) for c in done.cancelled] == [("a", 1)]
            assert done.retried == ["a"] and [r.id for r in done.ready] == ["a"]
            assert _state(database_url, "a") == ("ready", 1)
            # the same batch again (a scheduler killed before its offsets were committed)
            again = await apply(_cmd(5, "cancel", "a"), _cmd(6, "retry", "a"))
            assert again.replayed == 2 and not again.cancelled and not again.retried
            assert _state(database_url, "a") == ("ready", 1)
            # a cancel aimed at attempt 1, sent again later: attempt 1 is not in flight
            late = await apply(_cmd(7, "cancel", "a", attempt=1))
            assert not late.cancelled and _state(database_url, "a") == ("ready", 1)
            # an operator's cancel of the ready job: cancelled, no attempt to stop
            now = await apply(_cmd(8, "cancel", "a"))
            assert [(c.job, c.attempt) for c in now.cancelled] == [("a", None)]
            assert _state(database_url, "a") == ("cancelled", 1)

    asyncio.run(scenario())
