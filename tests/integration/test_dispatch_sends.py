"""The crash window between an admission's COMMIT and the broker's acknowledgement of its
dispatches, on real Kafka and PostgreSQL: a send whose row is still there (never confirmed)
is sent again by the reconciler; a confirmed one is not; no send row outlives it."""

from __future__ import annotations

import asyncio
import time

import psycopg

from agents.context import Context
from agents.core.semaphores import GLOBAL, SLOTS
from agents.scheduler.app import reconcile_once
from agents.settings import Settings
from agents.store import admission as admstore
from agents.store.admission import AdmitResult, Candidate
from agents.store.rows import Accepted
from streams.events import Dispatch, decode
from streams.topics import TopicRegistry
from tests.helpers import read_topic


def test_a_send_never_confirmed_is_sent_again_and_a_confirmed_one_is_not(
    settings: Settings, registry: TopicRegistry, kafka_bootstrap: str
) -> None:
    from streams.events import JobSpec

    dsn = settings.require_database()

    async def scenario() -> tuple[AdmitResult, AdmitResult, int]:
        ctx = Context(settings, registry)
        try:
            store = await ctx.store()
            jobs = [
                Accepted(JobSpec(id=j, tenant="t", kind="touch"), time.time(), 1, ("x", 0, i))
                for i, j in enumerate(["lost", "sent"])
            ]
            await store.settle_batch(
                jobs, [], now=time.time(), grace_s=60, allow_cross_tenant=False
            )

            async def admit(job: str) -> AdmitResult:
                async with store.pipelined() as conn:
                    async with conn.transaction():
                        await admstore.ensure_semaphores(conn, {SLOTS: 640})
                        holds = ((SLOTS, 64), (GLOBAL, 1))
                        pending = await admstore.admit(
                            conn, [Candidate(job, holds, ())], time.time()
                        )
                    return await pending.result()

            lost, sent = await admit("lost"), await admit("sent")
            # "sent" reached the broker (its send confirmed); "lost" died with its process
            await store.confirm_send(sent.send or -1)
            with psycopg.connect(dsn) as conn:  # both older than the reconciler's bound
                conn.execute("UPDATE jobs SET dispatched_at = now() - interval '1 minute'")
            _, resent = await reconcile_once(ctx)
            return lost, sent, resent
        finally:
            await ctx.close()

    lost, sent, resent = asyncio.run(scenario())
    assert [x.job.id for x in lost.dispatched] == ["lost"] and lost.send is not None
    assert [x.job.id for x in sent.dispatched] == ["sent"] and sent.send != lost.send
    assert resent == 1
    topic = registry.name("jobs.dispatch")
    got = [decode(m.value(), Dispatch) for m in read_topic(kafka_bootstrap, topic, expect=1)]
    assert [(d.job_id, d.attempt) for d in got] == [("lost", 1)]
    with psycopg.connect(dsn) as conn:
        confirmed = conn.execute("SELECT id, dispatch_confirmed FROM jobs ORDER BY id").fetchall()
        sends = conn.execute("SELECT count(*) FROM dispatch_sends").fetchone()
    # the re-sent one confirmed row by row; the other by its send's row, now gone
    assert confirmed == [("lost", True), ("sent", False)]
    assert sends == (0,)

    async def again() -> int:
        ctx = Context(settings, registry)
        try:
            return (await reconcile_once(ctx))[1]
        finally:
            await ctx.close()

    assert asyncio.run(again()) == 0  # nothing left to send
