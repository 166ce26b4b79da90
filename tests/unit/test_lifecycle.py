"""Property tests of the job state machine (agents.core.lifecycle)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agents.core.lifecycle import (
    TERMINAL,
    Backoff,
    Cancelled,
    Dispatched,
    Event,
    Failed,
    Job,
    Started,
    State,
    Succeeded,
    apply,
    fold,
    start_is_stale,
)

attempts = st.integers(min_value=0, max_value=4)
workers = st.sampled_from(["w1", "w2"])
events = st.one_of(
    st.just(Dispatched()),
    st.builds(Started, attempts, st.sampled_from(["", "w1", "w2"])),
    st.builds(Succeeded, attempts),
    st.builds(
        Failed,
        attempts,
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.none() | workers,
    ),
    st.just(Cancelled()),
    st.builds(Cancelled, attempts),
)
jobs = st.builds(
    Job, st.sampled_from(list(State)), attempts, st.integers(1, 4), st.none() | workers
)


def run(job: Job, evs: list[Event]) -> Job:
    for e in evs:
        job = apply(job, e)
    return job


@given(jobs, st.lists(events, max_size=12))
def test_terminal_states_absorb_everything(job: Job, evs: list[Event]) -> None:
    job = Job(State.SUCCEEDED, job.attempt, job.max_attempts)
    assert run(job, evs) == job


@given(jobs, events)
def test_an_event_applied_twice_equals_once_except_dispatch(job: Job, ev: Event) -> None:
    once = apply(job, ev)
    if isinstance(ev, Dispatched):
        return  # a new dispatch is a new attempt by design; the SQL guard needs state=ready
    assert apply(once, ev) == once


@given(jobs, st.sampled_from([Started, Succeeded, Failed]), attempts)
def test_events_of_other_attempts_are_fenced(job: Job, kind: type, attempt: int) -> None:
    if attempt == job.attempt:
        return
    assert apply(job, kind(attempt)) == job


@given(st.integers(1, 5), st.lists(st.booleans(), min_size=1, max_size=8))
def test_failures_retry_up_to_max_attempts_then_fail(
    max_attempts: int, retryable: list[bool]
) -> None:
    job = Job(State.READY, 0, max_attempts)
    for r in retryable:
        if job.state in TERMINAL:
            break
        job = apply(job, Dispatched())
        job = apply(job, Started(job.attempt))
        job = apply(job, Failed(job.attempt, r))
    assert job.attempt <= max_attempts
    if job.state == State.READY:
        assert job.attempt < max_attempts and all(retryable[: job.attempt])
    else:
        assert job.state == State.FAILED


@given(jobs, st.lists(events, max_size=20))
def test_attempt_never_decreases_and_never_exceeds_dispatches(job: Job, evs: list[Event]) -> None:
    dispatches = 0
    for e in evs:
        nxt = apply(job, e)
        assert nxt.attempt >= job.attempt
        if nxt.attempt > job.attempt:
            dispatches += 1
            assert isinstance(e, Dispatched) and job.state == State.READY
        job = nxt


@given(
    st.integers(1, 5), st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=12)
)
def test_handed_back_attempts_are_not_counted(
    max_attempts: int, outcomes: list[tuple[bool, bool]]
) -> None:
    """(retryable, counts) failures: counted failures never exceed max_attempts, and a job
    fails only once its counted attempts are used up or a failure is not retryable."""
    job = Job(State.READY, 0, max_attempts)
    counted = 0
    for retryable, counts in outcomes:
        if job.state in TERMINAL:
            break
        job = apply(job, Dispatched())
        job = apply(job, Failed(job.attempt, retryable, counts))
        counted += counts
        assert counted <= max_attempts
        if job.state == State.FAILED:
            assert not retryable or counted == max_attempts
        else:
            assert job.state == State.READY and counted < max_attempts


@given(jobs, attempts)
def test_a_cancel_of_an_attempt_applies_only_while_it_is_in_flight(job: Job, attempt: int) -> None:
    after = apply(job, Cancelled(attempt))
    in_flight = job.state in (State.DISPATCHED, State.RUNNING) and job.attempt == attempt
    assert (after.state == State.CANCELLED and job.state not in TERMINAL) == in_flight
    if not in_flight:
        assert after == job


@given(st.integers(1, 4), st.lists(events, max_size=10))
def test_a_cancel_replayed_after_a_retry_cancels_nothing(n: int, evs: list[Event]) -> None:
    """Attempt n running is cancelled; a retry puts the job back (waiting, then ready and a
    later attempt): the same cancel, replayed at any point after that, changes nothing."""
    cancel = Cancelled(n)
    job = apply(Job(State.RUNNING, n, 5), cancel)
    assert job.state == State.CANCELLED
    job = Job(State.READY, n, 5)  # ``jobstream retry``
    for e in [*evs, Dispatched()]:
        before = job
        job = apply(job, cancel)
        assert job == before
        job = apply(job, e)
        if job.attempt > n and isinstance(e, Dispatched):
            break


@given(jobs, workers)
def test_a_start_of_the_running_attempt_elsewhere_moves_it_and_changes_nothing_else(
    job: Job, worker: str
) -> None:
    """A dispatch redelivered after its partition moved starts the same attempt on another
    worker: the attempt is that worker's from then on; its state, attempt and budget stay."""
    job = Job(State.RUNNING, job.attempt, job.max_attempts, job.worker)
    after = apply(job, Started(job.attempt, worker))
    assert (after.state, after.attempt, after.max_attempts) == (
        job.state,
        job.attempt,
        job.max_attempts,
    )
    assert after.worker == worker
    assert apply(job, Started(job.attempt)) == job  # a start naming no worker moves nothing


@given(jobs, workers, st.booleans())
def test_a_lost_workers_failure_applies_only_while_the_attempt_is_on_that_worker(
    job: Job, lost: str, retryable: bool
) -> None:
    """The monitor fails the attempt of a worker it judged lost; if the attempt started
    again on another worker since, that failure changes nothing (no second attempt, nothing
    given back while the process runs on)."""
    job = Job(State.RUNNING, job.attempt, job.max_attempts, job.worker)
    judged = apply(job, Failed(job.attempt, retryable, backoff=False, lost_worker=lost))
    if job.worker is not None and job.worker != lost:
        assert judged == job
    else:
        assert judged == apply(job, Failed(job.attempt, retryable, backoff=False))
        assert judged != job


@given(jobs, attempts)
def test_a_start_is_stale_only_when_it_changed_nothing_and_its_attempt_is_over(
    job: Job, attempt: int
) -> None:
    """The dependency stage stops the attempts whose start is stale: never the attempt that
    runs (or is dispatched) now, never a repeat of one that ended, always one the job moved
    past or one handed back or cancelled before it started."""
    stale = start_is_stale(job, attempt)
    if stale:
        assert apply(job, Started(attempt)) == job  # it changed nothing
    current = job.attempt == attempt
    if current and job.state in (State.DISPATCHED, State.RUNNING, State.SUCCEEDED, State.FAILED):
        assert not stale
    if attempt < job.attempt:
        assert stale
    if current and job.state in (State.READY, State.WAITING, State.CANCELLED):
        assert stale


@given(st.integers(1, 4), st.lists(events, max_size=10))
def test_a_handed_back_dispatch_started_later_is_stale_whatever_happened_since(
    n: int, evs: list[Event]
) -> None:
    """Attempt n handed back (not counted) before it started: its dispatch, read by a
    worker at any later point, reports a start that is stale."""
    job = apply(Job(State.DISPATCHED, n, n), Failed(n, retryable=True, counts=False))
    assert job.state == State.READY
    for e in evs:
        job = apply(job, e)
        if job.attempt == n and job.state in (State.DISPATCHED, State.RUNNING):
            break  # only a fresh dispatch makes attempt n current again: never happens
        assert start_is_stale(job, n) or job.state in (State.SUCCEEDED, State.FAILED)


@given(jobs, st.booleans())
def test_a_hand_back_of_an_unread_dispatch_never_stops_a_started_attempt(
    job: Job, retryable: bool
) -> None:
    """The monitor hands back a dispatch no live worker seemed to consume; when the start of
    that attempt was recorded first, the attempt runs on (the hand-back changes nothing)."""
    after = apply(job, Failed(job.attempt, retryable, counts=False, unstarted=True))
    if job.state != State.DISPATCHED:
        assert after == job
    else:
        assert after.state in (State.READY, State.FAILED)


backoffs = st.builds(Backoff, st.floats(0, 60), st.floats(0, 3600))
clock = st.floats(0, 2e9)


@given(jobs, st.lists(events, max_size=12), backoffs, clock)
def test_folding_a_batch_equals_applying_its_events_one_by_one(
    job: Job, evs: list[Event], backoff: Backoff, now: float
) -> None:
    """One change per job per cycle: the same job as the events applied in order, and the
    events that applied are exactly those that changed the job when they came."""
    change = fold(job, list(enumerate(evs)), backoff, now)
    assert change.before == job
    assert change.after == run(job, evs)
    state, applied = job, []
    for i, e in enumerate(evs):
        if apply(state, e) != state:
            applied.append(i)
        state = apply(state, e)
    assert list(change.applied) == applied
    assert change.changed == bool(applied)


@given(jobs, st.lists(events, max_size=12), backoffs, clock)
def test_a_retry_waits_its_backoff_only_after_a_failure_that_was_the_jobs(
    job: Job, evs: list[Event], backoff: Backoff, now: float
) -> None:
    change = fold(job, list(enumerate(evs)), backoff, now)
    if change.run_after is None:
        return
    assert change.after.state == State.READY
    last = evs[change.applied[-1]]
    assert isinstance(last, Failed) and last.backoff and last.retryable
    assert now <= change.run_after <= now + backoff.cap_s


@given(backoffs, st.integers(1, 1000))
def test_backoff_doubles_per_attempt_up_to_its_cap(backoff: Backoff, attempt: int) -> None:
    d = backoff.delay(attempt)
    assert 0 <= d <= backoff.cap_s
    assert d == min(backoff.cap_s, backoff.base_s * 2.0 ** (min(attempt, 30) - 1))
    assert backoff.delay(attempt + 1) >= d


def test_a_start_and_its_outcome_in_one_batch_are_one_change() -> None:
    job = Job(State.DISPATCHED, 1, 3)
    ok = fold(job, [(0, Started(1)), (1, Succeeded(1))], Backoff(), 100.0)
    assert ok.after == Job(State.SUCCEEDED, 1, 3) and ok.applied == (0, 1)
    failed = fold(job, [(0, Started(1)), (1, Failed(1))], Backoff(2.0, 60.0), 100.0)
    assert failed.after == Job(State.READY, 1, 3) and failed.run_after == 102.0
    lost = fold(job, [(0, Failed(1, backoff=False))], Backoff(2.0, 60.0), 100.0)
    assert lost.after.state == State.READY and lost.run_after is None
    last = fold(Job(State.RUNNING, 3, 3), [(0, Failed(3))], Backoff(), 100.0)
    assert last.after.state == State.FAILED and last.run_after is None


@given(jobs, st.lists(events, max_size=12), backoffs, clock)
def test_a_fold_names_the_state_after_each_applied_event(
    job: Job, evs: list[Event], backoff: Backoff, now: float
) -> None:
    change = fold(job, list(enumerate(evs)), backoff, now)
    state = job
    expected = []
    for e in evs:
        nxt = apply(state, e)
        if nxt != state:
            expected.append(nxt.state)
        state = nxt
    assert list(change.states) == expected
