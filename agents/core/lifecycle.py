"""The job state machine, and what each lifecycle event does to a job.

States::

    waiting ─► ready ─► dispatched ─► running ─► succeeded
       │         ▲          │            │
       │         └──retry───┴────────────┤
       └────────────────────────────────►┴─► failed / cancelled

Invariants (property-tested):
- Terminal states (succeeded, failed, cancelled) absorb every later event.
- An event for another attempt than the job's current one changes nothing (fencing), so a
  late report from a superseded attempt cannot complete a retried job.
- A handed-back attempt (``Failed(counts=False)``) raises the job's attempt budget by one, so
  the number of counted attempts never exceeds ``max_attempts``.
- A hand-back of a dispatch no worker consumed (``Failed(unstarted=True)``) changes the job
  only while that attempt is dispatched: once its start is recorded, the attempt runs on.
- A cancel aimed at attempt n changes the job only while attempt n is dispatched or
  running, so a cancel replayed after a retry cannot cancel the retried job.
- The attempt belongs to the worker its latest start names: a start of the running attempt
  from another worker (its dispatch redelivered after a partition moved) moves it there, and
  a failure the monitor decided because a worker was lost (``Failed(lost_worker=w)``)
  changes the job only while the attempt is on ``w``.
- Applying the same event twice is the same as applying it once (idempotence), which is what
  makes at-least-once delivery safe.
- A retry waits ``Backoff.delay`` after the failed attempt (doubling per attempt, capped),
  unless the failure was not the job's; the wait never exceeds the cap.

The dependency stage locks the rows a batch's events touch, folds each job's events here
(:func:`fold`) and writes the result guarded by the state and attempt it read
(``agents.store.lifecycle``); the dispatch and cancel guards in SQL are the same table
expressed as ``UPDATE … WHERE state = ANY(…) AND attempt = …``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    WAITING = "waiting"
    READY = "ready"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})
ACTIVE = frozenset({State.DISPATCHED, State.RUNNING})

# event name -> states it applies in
STARTED_FROM = (State.DISPATCHED,)
FINISHED_FROM = (State.DISPATCHED, State.RUNNING)
# a dispatch handed back unread (no live worker consumed it) applies only while no start of
# that attempt was recorded: a start that won the race keeps the attempt running
UNSTARTED_FROM = (State.DISPATCHED,)
CANCEL_FROM = (State.WAITING, State.READY, State.DISPATCHED, State.RUNNING)
# a cancel aimed at one attempt applies only while that attempt is in flight: replayed after
# a retry (the job waiting or ready again, or on a later attempt) it changes nothing
CANCEL_ATTEMPT_FROM = (State.DISPATCHED, State.RUNNING)
DISPATCH_FROM = (State.READY,)


@dataclass(frozen=True, slots=True)
class Job:
    state: State
    attempt: int
    max_attempts: int
    worker: str | None = None  # the worker the attempt's latest recorded start names


@dataclass(frozen=True, slots=True)
class Dispatched:
    pass


@dataclass(frozen=True, slots=True)
class Started:
    attempt: int
    worker: str = ""  # "": not known (a repeated start then changes nothing)


@dataclass(frozen=True, slots=True)
class Succeeded:
    attempt: int


@dataclass(frozen=True, slots=True)
class Failed:
    attempt: int
    retryable: bool = True
    counts: bool = True  # False: handed back by its worker, the attempt is given back
    unstarted: bool = False  # True: handed back by the monitor before any start was recorded
    backoff: bool = True  # False: the failure was not the job's (a lost worker): retry at once
    # the monitor judged this worker lost: the failure applies only while the attempt's
    # latest start names it (a start of the same attempt on another worker, its dispatch
    # redelivered after a partition moved, runs on)
    lost_worker: str | None = None


@dataclass(frozen=True, slots=True)
class Cancelled:
    attempt: int | None = None  # None: whatever the job does now; n: only attempt n in flight


Event = Dispatched | Started | Succeeded | Failed | Cancelled


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long a retried attempt waits: attempt n failed, the next starts no earlier than
    ``min(cap_s, base_s · 2^(n-1))`` later."""

    base_s: float = 1.0
    cap_s: float = 300.0

    def delay(self, attempt: int) -> float:
        return min(self.cap_s, self.base_s * 2.0 ** (min(max(attempt, 1), 30) - 1))


@dataclass(frozen=True, slots=True)
class Change:
    """What a batch's events did to one job: the job before and after them, which of the
    events applied (their positions in the batch), and when a retry may start (None: at once,
    or not a retry)."""

    before: Job
    after: Job
    applied: tuple[int, ...]
    run_after: float | None = None
    states: tuple[State, ...] = ()  # the job's state after each applied event

    @property
    def changed(self) -> bool:
        return bool(self.applied)


def fold(job: Job, events: Sequence[tuple[int, Event]], backoff: Backoff, now: float) -> Change:
    """Apply a job's events of one batch in their order (a start and its outcome become one
    change); a failure that sends the job back to ``ready`` waits out ``backoff`` from
    ``now`` unless it was not the job's failure (``Failed(backoff=False)``)."""
    after = job
    applied: list[int] = []
    states: list[State] = []
    run_after: float | None = None
    for i, ev in events:
        nxt = apply(after, ev)
        if nxt == after:
            continue
        applied.append(i)
        states.append(nxt.state)
        run_after = None  # a retry's wait belongs to the failure that made the job ready
        if isinstance(ev, Failed) and nxt.state is State.READY and ev.backoff:
            run_after = now + backoff.delay(after.attempt)
        after = nxt
    return Change(job, after, tuple(applied), run_after, tuple(states))


def retry_allowed(job: Job, retryable: bool) -> bool:
    return retryable and job.attempt < job.max_attempts


def start_is_stale(job: Job, attempt: int) -> bool:
    """Whether a reported start of ``attempt`` that did not apply is of an attempt already
    over while its process may run: the job is on a later attempt, or that attempt was handed
    back or cancelled before it started (its holds are given back). Its worker must stop it.
    A repeated start of the running attempt, or of one that ended, is not: it ran already."""
    if apply(job, Started(attempt)) != job:
        return False
    return attempt < job.attempt or (
        attempt == job.attempt and job.state in (State.WAITING, State.READY, State.CANCELLED)
    )


def apply(job: Job, event: Event) -> Job:
    """The job after ``event``; the same job when the event does not apply."""
    s = job.state
    if s in TERMINAL:
        return job
    match event:
        case Dispatched():
            if s in DISPATCH_FROM:
                return Job(State.DISPATCHED, job.attempt + 1, job.max_attempts)
        case Started(attempt=a, worker=w):
            if s in STARTED_FROM and a == job.attempt:
                return Job(State.RUNNING, job.attempt, job.max_attempts, w or job.worker)
            if s is State.RUNNING and a == job.attempt and w and w != job.worker:
                # the same attempt started again elsewhere (its dispatch redelivered): the
                # latest start names the worker that owns it now
                return Job(State.RUNNING, job.attempt, job.max_attempts, w)
        case Succeeded(attempt=a):
            if s in FINISHED_FROM and a == job.attempt:
                return Job(State.SUCCEEDED, job.attempt, job.max_attempts, job.worker)
        case Failed(attempt=a, retryable=r, counts=c, unstarted=u, lost_worker=lost):
            if lost is not None and job.worker is not None and lost != job.worker:
                return job  # the attempt runs on a worker that was not judged lost
            if s in (UNSTARTED_FROM if u else FINISHED_FROM) and a == job.attempt:
                limit = job.max_attempts + (0 if c else 1)
                nxt = State.READY if r and job.attempt < limit else State.FAILED
                return Job(nxt, job.attempt, limit, job.worker)
        case Cancelled(attempt=None):
            if s in CANCEL_FROM:
                return Job(State.CANCELLED, job.attempt, job.max_attempts, job.worker)
        case Cancelled(attempt=a):
            if s in CANCEL_ATTEMPT_FROM and a == job.attempt:
                return Job(State.CANCELLED, job.attempt, job.max_attempts, job.worker)
    return job
