"""Dispatch confirmation and the reconciler's safety net: sends the broker confirmed,
dispatches never confirmed, the rate log's pruning."""

from __future__ import annotations

from collections.abc import Sequence

from agents.store.connection import Connections
from agents.store.rows import (
    CONFIRMED,
    DISPATCH_COLS,
    DispatchJob,
    q,
)

# window-log entries are kept this long beyond the longest window: the latest entries of a
# key bind its next admissions by their order (``agents.core.startlimit``), so an old entry
# goes only once nothing admitted around it can still start
RATE_LOG_KEEP_S = 600.0


class ReconcileStore(Connections):
    """Dispatch confirmation and the reconciler's statements."""

    async def unconfirmed_rows(self, ids: Sequence[str]) -> list[DispatchJob]:
        """Jobs of ``ids`` still dispatched whose dispatch was never confirmed (a crash between
        the admission transaction and the broker's acknowledgement)."""
        if not ids:
            return []
        async with self.tx() as conn:
            cur = await conn.execute(
                q(
                    "SELECT {cols} FROM jobs j WHERE id = ANY(%s) AND state = 'dispatched' "
                    "AND NOT {confirmed}",
                    cols=DISPATCH_COLS,
                    confirmed=CONFIRMED,
                ),
                (list(ids),),
            )
            return [DispatchJob(*r) for r in await cur.fetchall()]

    async def confirm_dispatch(self, jobs: Sequence[DispatchJob]) -> None:
        """Record that the broker has these re-sent dispatches (row by row: the reconciler's
        path; an admission's send is confirmed whole by :meth:`confirm_send`), and forget the
        sends they belonged to that have no other dispatch left unconfirmed."""
        if not jobs:
            return
        ids = [j.id for j in jobs]
        async with self.autocommit() as conn:  # one statement
            await conn.execute(
                """WITH u AS (
                       UPDATE jobs j SET dispatch_confirmed = true
                       FROM unnest(%s::text[], %s::int[]) AS v(id, attempt)
                       WHERE j.id = v.id AND j.attempt = v.attempt AND NOT j.dispatch_confirmed
                       RETURNING j.dispatch_send)
                   DELETE FROM dispatch_sends s WHERE s.id IN (SELECT dispatch_send FROM u)
                     AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.state = 'dispatched'
                                     AND o.dispatch_send = s.id AND NOT o.dispatch_confirmed
                                     AND o.id <> ALL(%s))""",
                (ids, [j.attempt for j in jobs], ids),
            )

    async def confirm_send(self, send: int) -> None:
        """Record that the broker has every dispatch of an admission's send: one row, never
        held by a transaction that records starts."""
        async with self.autocommit() as conn:
            await conn.execute("DELETE FROM dispatch_sends WHERE id = %s", (send,))

    async def prune_sends(self, older_than_s: float) -> int:
        """Forget sends a crash left unconfirmed (their jobs started since, or were re-sent)
        once the reconciler has had several chances to re-send their dispatches (one it
        missed counts as confirmed then: the liveness monitor's undelivered-work net hands
        it back if no live worker has it)."""
        async with self.autocommit() as conn:
            cur = await conn.execute(
                "DELETE FROM dispatch_sends WHERE at < now() - make_interval(secs => %s)",
                (older_than_s,),
            )
            return cur.rowcount

    async def prune_rate_log(self, now: float, config_horizon_s: float) -> int:
        """Delete window-log entries admitted and started (or ended unstarted) longer ago
        than the longest window of any limit plus ``RATE_LOG_KEEP_S``: an attempt that has
        not started yet stays, whatever its age (a later start still counts)."""
        async with self.tx() as conn:
            cur = await conn.execute(
                "WITH h AS (SELECT %s - %s - greatest(%s, "
                "coalesce((SELECT max(window_s) FROM rate_limits), 0)) AS before) "
                "DELETE FROM rate_log r USING h WHERE r.at <= h.before "
                "AND coalesce(r.started_at, r.at) <= h.before AND (r.started_at IS NOT NULL "
                "OR r.job_id IS NULL OR NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = r.job_id "
                "AND j.attempt = r.attempt AND j.state IN ('dispatched', 'running')))",
                (now, RATE_LOG_KEEP_S, config_horizon_s),
            )
            return cur.rowcount

    async def unconfirmed_dispatches(self, older_than_s: float, limit: int = 10_000) -> list[str]:
        async with self.tx() as conn:
            cur = await conn.execute(
                q(
                    "SELECT id FROM jobs j WHERE state = 'dispatched' AND NOT {confirmed} AND "
                    "dispatched_at < now() - make_interval(secs => %s) LIMIT %s",
                    confirmed=CONFIRMED,
                ),
                (older_than_s, limit),
            )
            return [r[0] for r in await cur.fetchall()]
