"""Periodic schedules' core: due ticks across DST changes, outages, crashes and two schedulers.

The reference is independent of ``Cron.ticks``: every instant of the period is walked (each
second or minute) and matched against the expression in the zone's wall time, with the
module's DST rules spelled out directly (first occurrence, both for hourly expressions; the
jump instant for wall times the clock skipped)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.core.schedules import Cron, ScheduleError, check_name, plan, tick_job_id

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
# instants a day or so before a DST change of the zones above (and some ordinary ones)
STARTS = [
    datetime(2026, 3, 28, 20, tzinfo=UTC),  # Europe forward
    datetime(2026, 10, 24, 20, tzinfo=UTC),  # Europe back
    datetime(2026, 3, 7, 20, tzinfo=UTC),  # US forward
    datetime(2026, 10, 31, 20, tzinfo=UTC),  # US back
    datetime(2026, 4, 4, 10, tzinfo=UTC),  # Lord Howe back (30 min)
    datetime(2026, 10, 3, 10, tzinfo=UTC),  # Lord Howe forward (30 min)
    datetime(2026, 6, 1, 0, tzinfo=UTC),
]
minutes = st.sampled_from(["*", "*/7", "0", "5,35", "0-10/3", "30"])
hours = st.sampled_from(["*", "2", "1-3", "*/5", "0,2,3"])
doms = st.sampled_from(["*", "*", "1", "*/10"])
months = st.sampled_from(["*", "*", "3,4,10,11"])
dows = st.sampled_from(["*", "*", "1-5", "0"])
exprs = st.builds(lambda *f: " ".join(f), minutes, hours, doms, months, dows)
second_exprs = st.sampled_from(["* * * * * *", "*/5 * * * * *", "* * * * * */7", "0-1 * * * * 30"])


def reference(expr: str, tz: str, after: float, until: float) -> list[float]:
    """Every tick in (after, until], by walking every step of the period."""
    zone = ZoneInfo(tz)
    step = 1 if len(expr.split()) == 6 else 60
    hourly = expr.split()[1] == "*"
    out: list[float] = []
    t = (int(after) // step + 1) * step
    prev_wall = datetime.fromtimestamp(t - step, zone)
    while t <= until:
        now = datetime.fromtimestamp(t, zone)
        wall = now.replace(tzinfo=None)
        gap = (wall - prev_wall.replace(tzinfo=None)).total_seconds()
        if gap > step:  # the clock jumped: wall times it skipped run at this instant
            skipped = [
                prev_wall.replace(tzinfo=None) + timedelta(seconds=k * step)
                for k in range(1, int(gap // step))
            ]
            if any(croniter.match(expr, w) for w in skipped) or croniter.match(expr, wall):
                out.append(float(t))
        elif croniter.match(expr, wall) and (now.fold == 0 or hourly):
            out.append(float(t))
        prev_wall = now
        t += step
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exprs, st.sampled_from(ZONES), st.sampled_from(STARTS))
def test_ticks_match_a_walk_of_every_minute_across_dst_changes(expr, tz, start):
    t0 = start.timestamp()
    got = Cron(expr, tz).ticks(t0, t0 + 1.5 * 86400, limit=10**6)
    assert got == reference(expr, tz, t0, t0 + 1.5 * 86400)
    assert got == sorted(set(got))  # ascending, no instant twice


@settings(max_examples=15, deadline=None)
@given(second_exprs, st.sampled_from(ZONES), st.sampled_from(STARTS))
def test_second_ticks_match_a_walk_of_every_second(expr, tz, start):
    t0 = start.timestamp()
    assert Cron(expr, tz).ticks(t0, t0 + 600, limit=10**6) == reference(expr, tz, t0, t0 + 600)


def test_dst_rules_named_in_the_docs():
    berlin = Cron("0 2 * * *", "Europe/Berlin")
    walls = [
        datetime.fromtimestamp(t, berlin.zone).strftime("%m-%d %H:%M %Z")
        for t in berlin.ticks(
            datetime(2026, 3, 28, tzinfo=UTC).timestamp(),
            datetime(2026, 3, 30, 12, tzinfo=UTC).timestamp(),
        )
    ]
    assert walls == ["03-28 02:00 CET", "03-29 03:00 CEST", "03-30 02:00 CEST"]
    back = berlin.ticks(
        datetime(2026, 10, 24, 12, tzinfo=UTC).timestamp(),
        datetime(2026, 10, 26, 12, tzinfo=UTC).timestamp(),
    )
    assert len(back) == 2  # the repeated 02:00 runs once
    every20 = Cron("*/20 * * * *", "Europe/Berlin")
    a = datetime(2026, 10, 24, 23, tzinfo=UTC).timestamp()
    assert len(every20.ticks(a, a + 4 * 3600)) == 12  # through the repeated hour: 3 an hour


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    exprs,
    st.sampled_from(ZONES),
    st.sampled_from(STARTS),
    st.sampled_from(["all", "latest", "none"]),
    # pass gaps in seconds: ordinary passes and outages (up to a day)
    st.lists(st.one_of(st.integers(1, 90), st.integers(600, 86400)), min_size=1, max_size=25),
    st.lists(st.booleans(), max_size=25),  # a pass crashed before recording its last tick
    # which of two schedulers ran the pass: B's clock is behind A's by up to 2 s
    st.lists(st.sampled_from([0.0, 0.7, 2.0]), max_size=25),
)
def test_passes_submit_every_due_tick_once_never_early(
    expr, tz, start, catch_up, gaps, crashes, who
):
    cron = Cron(expr, tz)
    grace = 60.0
    t0 = start.timestamp()
    last = t0  # the store's record, shared by both schedulers (one pass at a time)
    clock = t0
    jobs: dict[str, float] = {}  # submitted job id → its tick (submission is idempotent)
    passes: list[tuple[float, float, tuple[float, ...]]] = []
    for i, gap in enumerate(gaps):
        clock += gap
        now = clock - (who[i] if i < len(who) else 0.0)  # the clock of the pass's scheduler
        p = plan(cron, last, now, catch_up=catch_up, grace_s=grace)
        for tick in p.submit:
            assert tick <= now  # never early
            assert last < tick  # never a tick already handled
            jobs.setdefault(tick_job_id("s", tick), tick)
        crashed = i < len(crashes) and crashes[i]
        if not crashed:
            passes.append((last, now, p.submit))
            last = p.last
        assert p.last <= max(now, last)
    now = clock
    ticks = sorted(jobs.values())
    assert len(set(jobs)) == len(ticks)  # one job per tick
    ref = reference(expr, tz, t0, now)
    assert set(ticks) <= set(ref)
    if catch_up == "all" and last >= now - grace:
        # every tick up to the last pass's recorded end was submitted
        assert [t for t in ref if t <= last] == [t for t in ticks if t <= last]
    if not any(crashes):  # the windows of the passes are contiguous: check each
        for lo, hi, submitted in passes:
            due = [t for t in ref if lo < t <= hi]
            on_time = [t for t in due if t > hi - grace]
            missed = [t for t in due if t <= hi - grace]
            if catch_up == "all":
                assert list(submitted) == due
            elif catch_up == "none" or on_time:
                assert list(submitted) == on_time
            else:
                assert list(submitted) == missed[-1:]


def test_overlap_skip_submits_one_and_none_while_the_previous_runs():
    cron = Cron("* * * * * *")
    p = plan(cron, 100.0, 105.0, overlap="skip")
    assert p.submit == (105.0,) and p.skipped == 4 and p.last == 105.0
    p = plan(cron, 100.0, 105.0, overlap="skip", previous_running=True)
    assert p.submit == () and p.skipped == 5 and p.last == 105.0
    assert plan(cron, 100.0, 105.0).submit == (101.0, 102.0, 103.0, 104.0, 105.0)


def test_a_long_outage_with_catch_up_all_goes_on_over_several_passes():
    cron = Cron("* * * * * *")
    p = plan(cron, 0.0, 5000.0, catch_up="all", grace_s=10)
    assert len(p.submit) == 1000 and p.last == 1000.0
    p2 = plan(cron, p.last, 5000.0, catch_up="all", grace_s=10)
    assert p2.submit[0] == 1001.0


def test_tick_ids_are_stable_and_readable():
    assert tick_job_id("nightly", 1_700_000_000.0) == "schedule:nightly:2023-11-14T22:13:20Z"
    assert tick_job_id("n", 0.5) == "schedule:n:1970-01-01T00:00:00.500000Z"


@pytest.mark.parametrize(
    ("expr", "tz", "msg"),
    [
        ("61 * * * *", "UTC", "not valid"),
        ("* * *", "UTC", "3 fields"),
        ("0 2 * * *", "Mars/Olympus", "unknown time zone"),
    ],
)
def test_bad_schedules_say_what_is_wrong(expr, tz, msg):
    with pytest.raises(ScheduleError, match=msg):
        Cron(expr, tz)


def test_bad_names_are_refused():
    with pytest.raises(ScheduleError, match="schedule name"):
        check_name("no spaces")
    assert check_name("nightly-rescan") == "nightly-rescan"
