"""The hot cycle's transaction (submissions, lifecycle events, settlement and admission in
one), the waiting jobs' safety net, job commands and dead letters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from agents.core.deps import DependencyIndex, Fail, Release
from agents.core.lifecycle import Backoff
from agents.store.admission import (
    AdmitResult,
    CyclePlan,
    CyclePlanner,
    PendingAdmit,
    admit_locked,
    lock_semaphores,
    rate_limits_of,
    read_semaphores,
)
from agents.store.commands import Applied, JobCommand, apply_commands, apply_controls
from agents.store.connection import Connections
from agents.store.dependencies import (
    apply_decisions,
    load_working_set,
    queue_decisions,
    queue_working_set,
    read_ready,
    read_working_set,
)
from agents.store.inserts import queue_inserts, read_inserted
from agents.store.lifecycle import decide_lifecycle, queue_ended, queue_lifecycle
from agents.store.ratelog import rate_state
from agents.store.rows import (
    Accepted,
    DeadLetterRow,
    ReadyJob,
)
from streams.events import Control, JobEvent, JobStarted


def _merge_ready(retries: Sequence[ReadyJob], read: Sequence[ReadyJob]) -> list[ReadyJob]:
    """Ready jobs once each, a row read from PostgreSQL over a retry's bare record."""
    return list({r.id: r for r in (*retries, *read)}.values())


@dataclass(frozen=True, slots=True)
class Settled:
    """What a dependency batch's transaction did, for the stage to carry out."""

    ready: list[ReadyJob]  # jobs now ready (without a plan: to forward to their owner)
    rejected: list[Fail]  # submissions of the batch that can never run
    stale_starts: list[tuple[str, int]]  # started attempts already over (to stop)
    durations: list[tuple[str, float]]  # (kind, seconds) of the successes recorded
    released: bool = False  # attempts ended: their holds were given back
    # admission in the same transaction (``CyclePlanner``): what it planned (its
    # ``forward``: the ready jobs for other owners), what it did
    plan: CyclePlan | None = None
    admitted: AdmitResult | None = None


class CycleStore(Connections):
    """What the scheduler's cycle and its control stage write."""

    async def settle_batch(
        self,
        accepted: Sequence[Accepted],
        events: Sequence[JobEvent],
        *,
        now: float,
        grace_s: float,
        allow_cross_tenant: bool,
        backoff: Mapping[str, Backoff] | None = None,
        planner: CyclePlanner | None = None,
    ) -> Settled:
        """The hot cycle's transaction: persist submissions and lifecycle events, settle
        the affected part of the graph, admit into the capacity it freed, and return what
        follows (``Settled``: jobs to forward as ready, submissions of this batch rejected as
        impossible, reported starts of attempts already over whose process may run
        (``agents.core.lifecycle.start_is_stale``), the durations of the successes, and what
        ``planner``, the admission owner of this process, decided and dispatched).

        Round trips, whatever the batch: (1) the inserts, the rows the events touch (locked)
        and the working set around every job they may change; the core decides the
        transitions, then the dependencies; (2) the row updates, history, released holds,
        the decisions, the replay check, and with a planner that has something to decide
        the semaphores (locked); the planner decides; ((3) the window counts, when a
        candidate counts against a rate limit); the dispatches and COMMIT, read after the
        commit. Without a planner, or nothing to admit, COMMIT goes with (2)."""
        finished = [e.job_id for e in events if not isinstance(e, JobStarted)]
        plan: CyclePlan | None = None
        pending: PendingAdmit | None = None
        deciding: CyclePlanner | None = None
        try:
            async with self.pipelined() as conn:
                async with conn.transaction():
                    inserts = await queue_inserts(conn, accepted)
                    touched = await queue_lifecycle(conn, events)
                    # a superset of what changes (a duplicate changes nothing), read before
                    # the transitions: the core's new states replace the ones read
                    # (a new job that waits for nothing changes nobody: it is ready, and its
                    # dependents wait for its end)
                    waits = [a.job.id for a in accepted if a.job.depends_on or a.job.order_key]
                    around = await queue_working_set(conn, list(dict.fromkeys([*waits, *finished])))
                    inserted = await read_inserted(inserts)
                    ended = await decide_lifecycle(events, touched, backoff or {}, now)
                    nodes = [
                        replace(n, state=ended.states[n.id]) if n.id in ended.states else n
                        for n in await read_working_set(around)
                    ]
                    waiting = set(waits)
                    changed = [*(j for j in inserted if j in waiting), *ended.terminal]
                    decisions = DependencyIndex.of(nodes, allow_cross_tenant).settle(
                        changed, now, grace_s
                    )
                    # the planner decides when capacity was freed or jobs became ready
                    deciding = (
                        planner
                        if ended.over
                        or ended.retry
                        or len(waiting) < len(accepted)
                        or any(isinstance(d, Release) for d in decisions)
                        else None
                    )
                    await queue_ended(conn, ended, deciding.origin if deciding else None)
                    # released now, and (after a replay) released before but maybe never
                    # forwarded; retries with the columns admission queues them by
                    ids = [*(a.job.id for a in accepted), *(r.id for r in ended.retry)]
                    reads = await queue_decisions(conn, decisions, ready_of=(ids, finished))
                    if deciding is not None:
                        locked = await lock_semaphores(conn)
                        found = await read_ready(reads)
                        semaphores = await read_semaphores(locked)
                        ready = _merge_ready(ended.retry, found)
                        plan = deciding.plan(ready, semaphores, now)
                        if plan.candidates:
                            rates = await rate_state(conn, rate_limits_of(plan.candidates), now)
                            pending = await admit_locked(
                                conn, plan.candidates, semaphores, rates, now
                            )
                # COMMIT went out with the statements above: their results come in one trip
                if plan is None:
                    ready = _merge_ready(ended.retry, await read_ready(reads))
                admitted = await pending.result() if pending is not None else None
        except BaseException:
            if plan is not None and deciding is not None:
                deciding.abandon(plan)
            raise
        new = set(inserted)
        rejected = [d for d in decisions if isinstance(d, Fail) and d.rejected and d.job in new]
        return Settled(
            ready,
            rejected,
            ended.stale_starts,
            ended.durations,
            released=bool(ended.over),
            plan=plan,
            admitted=admitted,
        )

    async def settle_waiting(
        self,
        older_than_s: float,
        *,
        now: float,
        grace_s: float,
        allow_cross_tenant: bool,
        limit: int = 5_000,
    ) -> list[ReadyJob]:
        """Re-settle waiting jobs older than ``older_than_s``: expire dependencies that never
        arrived and release jobs a race left waiting (the safety net)."""
        async with self.tx() as conn:
            cur = await conn.execute(
                "SELECT id FROM jobs WHERE state = 'waiting' AND accepted_at < "
                "now() - make_interval(secs => %s) ORDER BY accepted_at LIMIT %s",
                (older_than_s, limit),
            )
            ids = [r[0] for r in await cur.fetchall()]
            nodes = await load_working_set(conn, ids)
            decisions = DependencyIndex.of(nodes, allow_cross_tenant).settle(ids, now, grace_s)
            return await apply_decisions(conn, decisions)

    async def apply_job_commands(
        self, cmds: Sequence[JobCommand], *, now: float, grace_s: float, allow_cross_tenant: bool
    ) -> Applied:
        """Cancels and retries from ``jobs.control``, in order and exactly once, with their
        dependents settled (``agents.store.commands``): what was cancelled (and which attempt was
        in flight), what was retried, and the jobs now ready."""
        async with self.tx() as conn:
            return await apply_commands(
                conn, cmds, now=now, grace_s=grace_s, allow_cross_tenant=allow_cross_tenant
            )

    async def apply_controls(self, cmds: Sequence[Control]) -> None:
        """Pauses, resumes, priorities and rate limits from ``jobs.control``, durable and
        announced to every admission process (``agents.store.commands``)."""
        async with self.tx() as conn:
            await apply_controls(conn, cmds)

    async def job_route(self, ids: Sequence[str]) -> dict[str, tuple[str | None, str]]:
        """job id → (group key, state) for the jobs that exist among ``ids``."""
        async with self.reading() as conn:
            cur = await conn.execute(
                "SELECT id, group_key, state FROM jobs WHERE id = ANY(%s)", (list(ids),)
            )
            rows = {r[0]: (r[1], r[2]) for r in await cur.fetchall()}
            return rows

    async def record_dead_letters(self, rows: Sequence[DeadLetterRow]) -> None:
        if not rows:
            return
        async with self.tx() as conn, conn.cursor() as cur:
            await cur.executemany(
                'INSERT INTO dead_letters (topic, partition, "offset", key, value, reason) '
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [(r.topic, r.partition, r.offset, r.key, r.value, r.reason) for r in rows],
            )
