"""The start-time limiter (``agents.core.startlimit``): whatever the delay between admission
and start, the order starts happen in, the delay before a start is reported, the number of
workers and the attempts lost before they start, no window of a key holds more than its
limit of starts; and in a steady flow the limit is used in full."""

from __future__ import annotations

import heapq
import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.core.startlimit import StartLimiter, StartLog, batch_not_before


def max_in_window(starts: list[float], window_s: float) -> int:
    """The most starts any half-open window ``(t − W, t]`` holds."""
    s = sorted(starts)
    best, lo = 0, 0
    for hi, t in enumerate(s):
        while t - window_s >= s[lo]:  # the convention of agents.core.ratelimit
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def simulate(
    seed: int,
    keys: dict[str, tuple[int, float]],
    jobs: int,
    workers: int,
    jitter_s: float,
    report_s: float,
    lost: float,
    step_s: float = 0.01,
) -> dict[str, list[float]]:
    """Admission every ``step_s`` of whatever the limiter allows (demand: ``jobs`` waiting,
    each counted against a random non-empty subset of ``keys``); each admitted attempt is
    taken by one of ``workers`` workers after a random delay, started no earlier than its
    not-before, or lost before it starts; its start or loss reaches the limiter after
    another random delay. Returns the starts of each key."""
    rnd = random.Random(seed)
    lim = StartLimiter()
    names = sorted(keys)
    waiting = [
        tuple((k, *keys[k]) for k in names if rnd.random() < 0.7) or ((names[0], *keys[names[0]]),)
        for _ in range(jobs)
    ]
    reports: list[tuple[float, int, str, float]] = []  # (when known, ref, what, start)
    starts: dict[str, list[float]] = {k: [] for k in names}
    free_at = [0.0] * workers
    now, ref = 0.0, 0
    while (waiting or reports) and now < 3_600:
        while reports and reports[0][0] <= now:
            _, r, what, at = heapq.heappop(reports)
            lim.started(r, at) if what == "started" else lim.ended_unstarted(r)
        while waiting:
            job_keys = waiting[0]
            nb, _ = lim.not_before(job_keys)
            if nb is None:
                break
            waiting.pop(0)
            ref += 1
            lim.admit(ref, job_keys)
            if rnd.random() < lost:
                heapq.heappush(reports, (now + rnd.uniform(0, 5 * report_s), ref, "lost", 0.0))
                continue
            w = rnd.randrange(workers)
            arrives = now + rnd.expovariate(1 / jitter_s) if jitter_s else now
            start = max(nb, arrives, free_at[w])
            free_at[w] = start + rnd.uniform(0, jitter_s)
            for k, _, _ in job_keys:
                starts[k].append(start)
            heapq.heappush(reports, (start + rnd.uniform(0, report_s), ref, "started", start))
        now += step_s
    return starts


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    limit=st.integers(1, 12),
    window_s=st.sampled_from([0.05, 0.1, 0.3, 1.0]),
    workers=st.integers(1, 5),
    jitter_s=st.sampled_from([0.0, 0.005, 0.05, 0.4]),
    report_s=st.sampled_from([0.0, 0.01, 0.2]),
    lost=st.sampled_from([0.0, 0.1, 0.5]),
)
def test_no_window_holds_more_starts_than_the_limit(
    seed: int,
    limit: int,
    window_s: float,
    workers: int,
    jitter_s: float,
    report_s: float,
    lost: float,
) -> None:
    keys = {"tenant:a": (limit, window_s), "global": (limit + 3, window_s * 1.5)}
    starts = simulate(seed, keys, 120, workers, jitter_s, report_s, lost)
    for key, (n, w) in keys.items():
        assert max_in_window(starts[key], w) <= n, key


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), limit=st.integers(1, 20))
def test_a_steady_flow_uses_the_whole_limit(seed: int, limit: int) -> None:
    """Prompt reports (10 ms, window 1 s): every window of the flow holds N starts, within
    the admission loop's step."""
    window_s = 1.0
    starts = simulate(seed, {"k": (limit, window_s)}, limit * 20, 4, 0.002, 0.01, 0.0)["k"]
    s = sorted(starts)
    assert max_in_window(s, window_s) == limit
    span = s[-1] - s[0]
    # N starts per W: the first N at once, then N per window (each a step or two late)
    assert span <= (len(s) / limit - 1) * (window_s + 0.03) + 0.05


def test_the_next_admission_waits_for_the_start_it_depends_on() -> None:
    log = StartLog()
    assert log.not_before(2, 1.0) == -math.inf
    log.admit("a")
    assert log.not_before(2, 1.0) == -math.inf  # one unresolved: fine for N = 2
    log.admit("b")
    assert log.not_before(2, 1.0) is None  # "a" binds the third: its start is not known
    log.resolve("a", 10.0)
    assert log.not_before(2, 1.0) == 11.0
    log.admit("c")
    assert log.not_before(2, 1.0) is None  # "b" binds the fourth
    log.resolve("b", math.nan)  # ended without starting: binds nothing
    assert log.not_before(2, 1.0) == 11.0


def test_a_start_only_ever_counts_once_and_the_log_stays_small() -> None:
    lim = StartLimiter()
    keys = (("k", 3, 1.0),)
    for i in range(1_000):
        nb, _ = lim.not_before(keys)
        assert nb is not None
        lim.admit(i, keys)
        lim.started(i, max(nb, float(i)))
        lim.started(i, 0.0)  # a repeated report changes nothing
    assert len(lim.logs["k"].entries) <= 3  # the latest N, folded on the next question
    assert not lim.keys_of


def test_rebuilt_from_the_durable_log() -> None:
    lim = StartLimiter()
    # admissions 1, 2, 3 in order: the latest two newest first, the older one folded
    lim.replace("k", StartLog.of([(3, 6.0), (2, None)], 5.0, True))
    assert lim.not_before((("k", 2, 1.0),)) == (None, "k")  # 2 unresolved binds the next
    lim.started(2, 5.5)
    nb, key = lim.not_before((("k", 2, 1.0),))
    assert (nb, key) == (6.5, "k")


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 8),
    entries=st.lists(
        st.one_of(st.none(), st.just(math.nan), st.floats(0, 100, allow_nan=False)),
        max_size=20,
    ),
    window_s=st.sampled_from([0.1, 1.0, 7.5]),
)
def test_a_batch_gets_the_answers_of_one_admission_at_a_time(
    limit: int, entries: list[float | None], window_s: float
) -> None:
    """What the admission transaction computes from the durable log (latest entries, the
    older ones summarised) equals the in-memory log asked before each admission."""
    log = StartLog()
    for i, start in enumerate(entries):
        log.admit(i)
        if start is not None:
            log.resolve(i, start)
    recent = list(reversed(entries))[:limit]
    older = entries[: max(0, len(entries) - limit)]
    starts = [s for s in older if s is not None and not math.isnan(s)]
    got = batch_not_before(
        recent,
        max(starts, default=-math.inf),
        all(s is not None for s in older),
        limit,
        window_s,
    )
    want: list[float] = []
    for m in range(limit):
        nb = log.not_before(limit, window_s)
        if nb is None:
            break
        want.append(nb)
        log.admit(("new", m))
    assert got == want
    # the same log rebuilt from that summary answers the same
    rebuilt = StartLog.of(
        [(i, s) for i, s in zip(range(len(entries) - 1, -1, -1), recent, strict=False)],
        max(starts, default=-math.inf),
        all(s is not None for s in older),
    )
    assert rebuilt.not_before(limit, window_s) == (want[0] if want else None)


def test_a_log_read_again_replaces_what_this_process_knew() -> None:
    """Starts another scheduler recorded (or attempts that ended unstarted) reach this one
    when it reads the key's log again: the read replaces its log, and the attempts it had
    waited on are forgotten unless still unresolved."""
    lim = StartLimiter()
    keys = (("k", 1, 1.0),)
    lim.admit("x", keys)
    assert lim.not_before(keys) == (None, "k")
    lim.replace("k", StartLog.of([("x", 4.0)], -math.inf, True))
    assert lim.not_before(keys) == (5.0, "k")
    assert "x" not in lim.keys_of
    lim.admit("y", keys)
    lim.replace("k", StartLog.of([("y", None)], 4.0, True))
    assert lim.keys_of == {"y": ("k",)}
    lim.started("y", 6.0)
    assert lim.not_before(keys) == (7.0, "k")
    # an older admission not resolved yet binds until the log is read again
    lim.replace("k", StartLog.of([("y", 6.0)], 4.0, False))
    assert lim.not_before(keys) == (None, "k")
