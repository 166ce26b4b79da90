"""A cycle's lifecycle events persisted: the rows they touch read locked, the pure core
(``agents.core.lifecycle``) decides each job's transition, including retry and backoff, and
one statement writes the rows, the history and the holds given back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from agents.core.lifecycle import (
    TERMINAL,
    Backoff,
    Change,
    Event,
    Failed,
    Job,
    Started,
    State,
    Succeeded,
    fold,
    start_is_stale,
)
from agents.store.admission import release_attempt_holds
from agents.store.rows import ReadyJob, json_rows
from streams.events import JobCancelled, JobEvent, JobFailed, JobStarted, JobSucceeded

Conn = psycopg.AsyncConnection[Any]
Cursor = psycopg.AsyncCursor[Any]

DEFAULT_BACKOFF = Backoff()


@dataclass(slots=True)
class Ended:
    """What a batch's lifecycle events did: attempts that ended (terminal, or back to ready
    for a retry), the jobs' new states, the rows to write."""

    terminal: list[str]
    retry: list[ReadyJob]
    history: list[tuple[str, int, str, dict[str, Any]]]  # job, attempt, event, detail
    # attempts whose end was reported: what they hold is given back, whether the report
    # changed the job or was fenced off (a cancelled attempt that stopped, a superseded one)
    over: list[tuple[str, int]] = field(default_factory=list)
    # reported starts of attempts already over whose process may run (``start_is_stale``)
    stale_starts: list[tuple[str, int]] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)  # job → its state after the batch
    writes: list[dict[str, Any]] = field(default_factory=list)  # one row update per job
    durations: list[tuple[str, float]] = field(default_factory=list)  # (kind, s) of successes


@dataclass(frozen=True, slots=True)
class _Row:
    job: Job
    kind: str
    tenant: str
    submitted_at: float


def _lifecycle_ids(events: Sequence[JobEvent]) -> list[str]:
    return sorted({e.job_id for e in events if not isinstance(e, JobCancelled)})


async def queue_lifecycle(conn: Conn, events: Sequence[JobEvent]) -> Cursor | None:
    """Queue the read of the rows a batch's lifecycle events touch, locked in id order (the
    core decides on them: :func:`decide_lifecycle`). ``job.cancelled`` is an announcement:
    the control stage applied the cancel."""
    ids = _lifecycle_ids(events)
    if not ids:
        return None
    return await conn.execute(
        "SELECT id, state, attempt, max_attempts, kind, tenant,"
        " extract(epoch from submitted_at)::float8, worker FROM jobs WHERE id = ANY(%s)"
        " ORDER BY id FOR UPDATE",
        (ids,),
    )


def _core_event(ev: JobEvent) -> Event:
    if isinstance(ev, JobStarted):
        return Started(ev.attempt, ev.worker)
    if isinstance(ev, JobSucceeded):
        return Succeeded(ev.attempt)
    assert isinstance(ev, JobFailed)
    lost = ev.worker if ev.lost_worker else None
    return Failed(ev.attempt, ev.retryable, ev.counts, ev.unstarted, ev.backoff, lost)


def _history(ev: JobEvent, state: State) -> tuple[str, int, str, dict[str, Any]]:
    detail: dict[str, Any]
    if isinstance(ev, JobStarted):
        name, detail = "started", {"worker": ev.worker}
    elif isinstance(ev, JobSucceeded):
        name, detail = "succeeded", {"worker": ev.worker, "duration_s": ev.duration_s}
    else:
        assert isinstance(ev, JobFailed)
        name = str(state)  # ready (to be retried) or failed
        detail = {"worker": ev.worker, "error": ev.error[:500], "exit_code": ev.exit_code}
    return ev.job_id, ev.attempt, name, detail


def _write(change: Change, events: Sequence[JobEvent]) -> dict[str, Any]:
    """The row update of one job whose events applied: the columns the last one sets, and
    the start time from a start of this batch (else kept; a success without a recorded start
    started ``duration_s`` before it ended)."""
    applied = [e for i in change.applied if not isinstance(e := events[i], JobCancelled)]
    last = applied[-1]
    start = next((e for e in applied if isinstance(e, JobStarted)), None)
    row: dict[str, Any] = {
        "id": last.job_id,
        "was": str(change.before.state),
        "attempt": change.before.attempt,
        "state": str(change.after.state),
        "max_attempts": change.after.max_attempts,
        "started": start.at if start is not None else None,
        "start_known": start is not None,
        "outcome": None,
        "worker": last.worker or None,
        # the attempt's log file, named by its start (so a running or cancelled job has it)
        "log": start.log_path if start is not None else None,
    }
    if isinstance(last, JobSucceeded):
        if start is None:
            row["started"] = last.at - last.duration_s
        row.update(
            outcome="succeeded",
            finished=last.at,
            rc=last.exit_code,
            log=last.log_path or row["log"],
        )
        row.update(error=None, gate=None, progress=1.0)
    elif isinstance(last, JobFailed):
        retry = change.after.state is State.READY
        row.update(
            outcome="failed", finished=last.at, rc=last.exit_code, log=last.log_path or row["log"]
        )
        row.update(error=last.error[:4000], gate="retry" if retry else None, progress=None)
        row["run_after"] = change.run_after
    return row


async def decide_lifecycle(
    events: Sequence[JobEvent], cur: Cursor | None, backoff: Mapping[str, Backoff], now: float
) -> Ended:
    """Read the locked rows (:func:`queue_lifecycle`) and let the core fold each job's
    events (``agents.core.lifecycle.fold``): the row updates, history, ended attempts and
    stale starts of the batch."""
    rows: dict[str, _Row] = {}
    if cur is not None:
        for (
            jid,
            state,
            attempt,
            max_attempts,
            kind,
            tenant,
            submitted,
            worker,
        ) in await cur.fetchall():
            job = Job(State(state), attempt, max_attempts, worker)
            rows[jid] = _Row(job, kind, tenant, submitted)
    by_job: dict[str, list[tuple[int, Event]]] = {}
    for i, ev in enumerate(events):
        if not isinstance(ev, JobCancelled):
            by_job.setdefault(ev.job_id, []).append((i, _core_event(ev)))
    ended = Ended([], [], [])
    applied: set[int] = set()
    after: dict[str, Job] = {}  # each job after the batch (unchanged ones: as read)
    for jid, evs in by_job.items():
        row = rows.get(jid)
        if row is None:
            continue  # an unknown job: nothing to change
        change = fold(row.job, evs, backoff.get(row.kind, DEFAULT_BACKOFF), now)
        after[jid] = change.after
        if not change.changed:
            continue
        applied.update(change.applied)
        ended.writes.append(_write(change, events))
        ended.states[jid] = str(change.after.state)
        for i, state in zip(change.applied, change.states, strict=True):
            ended.history.append(_history(events[i], state))
            if isinstance(ev := events[i], JobSucceeded):
                ended.durations.append((row.kind, ev.duration_s))
        if change.after.state in TERMINAL:
            ended.terminal.append(jid)
        elif change.after.state is State.READY:
            ended.retry.append(ReadyJob(jid, row.tenant, row.kind, row.submitted_at))
    for i, ev in enumerate(events):
        if isinstance(ev, JobCancelled):
            continue
        if isinstance(ev, JobSucceeded) or (
            # a hand-back the attempt's recorded start won ends nothing: it runs on; nor
            # does a lost worker's failure of an attempt that started again elsewhere
            isinstance(ev, JobFailed)
            and not ev.keeps_holds
            and not ((ev.unstarted or ev.lost_worker) and i not in applied)
        ):
            ended.over.append((ev.job_id, ev.attempt))
        if (
            isinstance(ev, JobStarted)
            and i not in applied
            and ev.job_id in after
            and start_is_stale(after[ev.job_id], ev.attempt)
        ):
            ended.stale_starts.append((ev.job_id, ev.attempt))
    return ended


# the decided row updates, guarded by the state and attempt they were decided on (the rows
# are locked: the guard holds unless another writer ignored the lock)
_WRITE_LIFECYCLE = """
WITH v AS (
    SELECT * FROM jsonb_to_recordset(%s::jsonb) AS v(
        id text, was text, attempt int, state text, max_attempts int, started float8,
        start_known bool, outcome text, worker text, finished float8, rc int, log text,
        error text, gate text, progress float8, run_after float8)),
-- the start of an attempt a rate limit counted: the window log holds it at its start (as the
-- worker's clock says, but never later than now: a clock ahead would hold the next ones back)
started AS (
    UPDATE rate_log r SET started_at = least(v.started, extract(epoch from clock_timestamp()))
    FROM v
    WHERE v.started IS NOT NULL AND r.job_id = v.id AND r.attempt = v.attempt
      AND r.started_at IS NULL)
UPDATE jobs j SET
    state = v.state,
    max_attempts = v.max_attempts,
    started_at = CASE WHEN v.start_known THEN to_timestamp(v.started)
                      ELSE coalesce(j.started_at, to_timestamp(v.started)) END,
    worker = v.worker,
    -- a recorded start proves the dispatch reached the broker
    dispatch_confirmed = j.dispatch_confirmed OR v.start_known,
    finished_at = CASE WHEN v.outcome IS NULL THEN j.finished_at
                       ELSE to_timestamp(v.finished) END,
    exit_code = CASE WHEN v.outcome IS NULL THEN j.exit_code ELSE v.rc END,
    log_path = coalesce(v.log, j.log_path),
    error = CASE WHEN v.outcome IS NULL THEN j.error ELSE v.error END,
    gate = CASE WHEN v.outcome IS NULL THEN j.gate ELSE v.gate END,
    progress = CASE WHEN v.outcome IS NULL THEN j.progress ELSE v.progress END,
    run_after = CASE WHEN v.outcome = 'failed' THEN to_timestamp(v.run_after)
                     ELSE j.run_after END,
    ready_at = CASE WHEN v.outcome = 'failed' THEN now() ELSE j.ready_at END,
    updated_at = now()
FROM v WHERE j.id = v.id AND j.state = v.was AND j.attempt = v.attempt
"""


async def queue_ended(conn: Conn, ended: Ended, origin: str | None = None) -> None:
    """The decided row updates, their history rows, and what the ended attempts held given
    back (nothing to read; ``origin``: see ``release_attempt_holds``)."""
    if ended.writes:
        await conn.execute(_WRITE_LIFECYCLE, (json_rows(ended.writes),))
    if ended.history:
        # one JSON document of rows (``json_rows``: four array parameters cost ~10 % of the
        # scheduler's CPU in a flood)
        await conn.execute(
            "INSERT INTO job_history (job_id, attempt, event, detail) "
            "SELECT h->>0, (h->>1)::int, h->>2, h->3 FROM jsonb_array_elements(%s::jsonb) h",
            (json_rows(ended.history),),
        )
    await release_attempt_holds(conn, ended.over, origin)
