"""Periodic schedules: which ticks of a cron expression are due, and which of them to submit.

A schedule names a cron expression (``croniter``'s syntax: five fields, or six with seconds
as the last field), a time zone (``zoneinfo``) and a job to submit at each tick. Ticks are
instants (float seconds since the epoch): the expression is walked in the zone's wall time
and each wall time is mapped to an instant here, so daylight saving time follows one rule
(Vixie cron's) instead of a library's:

- a wall time that does not exist (the clock jumps forward over it) runs at the instant
  the jump lands on, once: ``0 2 * * *`` runs at 03:00 on the spring-forward day in Berlin,
  and ``*/20 * * * *`` runs 03:00, 03:20, 03:40 (not twice);
- a wall time that occurs twice (the clock goes back) runs at its first occurrence, and a
  second time only for an expression that runs every hour (hour field ``*``): a daily job
  runs once, an every-20-minutes job keeps running through the repeated hour.

Each pass of a scheduler takes the ticks in ``(last, now]`` (``last``: the latest tick the
store has recorded as handled) and :func:`plan` says which to submit. A tick is **on time**
when it is at most ``grace_s`` old; older ticks were **missed** (an outage) and follow the
schedule's ``catch_up``: ``all`` submits them, ``latest`` only the latest missed one when no
tick is on time, ``none`` none. ``overlap = "skip"`` submits one tick at most, and none while
the previous run is still going. Submitting is idempotent on the job id built from the tick
(:func:`tick_job_id`), so a pass repeated after a crash submits nothing twice; passes of two
schedulers are serialised by the store (the schedule's row is locked for a pass).

Pure: no I/O; ``now`` and ``last`` are arguments.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

CatchUp = Literal["all", "latest", "none"]
Overlap = Literal["skip", "allow"]
CATCH_UP: tuple[str, ...] = ("all", "latest", "none")
OVERLAP: tuple[str, ...] = ("skip", "allow")
MAX_TICKS_PER_PASS = 1000  # ``all`` after a long outage: the rest in the next passes
COUNT_LIMIT = 10_000  # missed ticks counted (for the record) at most
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# how far around the window wall times are walked: more than any zone's offset change
_MARGIN = timedelta(hours=3)


class ScheduleError(ValueError):
    """A schedule that cannot be used, with what is wrong in words."""


class Cron:
    """A cron expression in a time zone: its ticks as instants."""

    __slots__ = ("expr", "tz", "zone", "seconds", "hourly")

    def __init__(self, expr: str, tz: str = "UTC") -> None:
        fields = expr.split()
        if len(fields) not in (5, 6):
            raise ScheduleError(
                f"cron expression {expr!r} has {len(fields)} fields; five (minute hour day "
                "month weekday) or six (… and seconds last) are expected"
            )
        if not croniter.is_valid(expr):
            raise ScheduleError(f"cron expression {expr!r} is not valid")
        try:
            self.zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ScheduleError(
                f"unknown time zone {tz!r} (an IANA name, e.g. Europe/Berlin)"
            ) from exc
        self.expr = " ".join(fields)
        self.tz = tz
        self.seconds = len(fields) == 6
        self.hourly = fields[1] == "*"  # runs every hour: also in a repeated hour

    def _instants(self, wall: datetime) -> list[float]:
        """The instants a wall time of the zone stands for (see the module's rules)."""
        first = wall.replace(tzinfo=self.zone, fold=0)
        second = wall.replace(tzinfo=self.zone, fold=1)
        a, b = first.timestamp(), second.timestamp()
        if _wall(a, self.zone) != wall:  # does not exist: the clock jumped over it
            return [_jump_end(wall, self.zone)]
        if a != b and self.hourly:  # occurs twice
            return [a, b]
        return [a]

    def ticks(self, after: float, until: float, limit: int = MAX_TICKS_PER_PASS) -> list[float]:
        """The ticks t with ``after < t <= until``, ascending, at most ``limit``."""
        if until <= after:
            return []
        out: set[float] = set()
        start = _wall(after, self.zone) - _MARGIN
        it = croniter(self.expr, start)
        end = _wall(until, self.zone) + _MARGIN
        while True:
            wall = it.get_next(datetime)
            if wall > end:
                break
            for t in self._instants(wall):
                if after < t <= until:
                    out.add(t)
            if len(out) > limit + 2:  # a few past the limit: the instants can come unordered
                break
        return sorted(out)[:limit]

    def latest(self, at_or_before: float) -> float | None:
        """The latest tick at or before an instant (None: none within 400 days before)."""
        it = croniter(self.expr, _wall(at_or_before, self.zone) + _MARGIN)
        stop_wall = _wall(at_or_before - 400 * 86400, self.zone)
        best: float | None = None
        while True:
            wall = it.get_prev(datetime)
            if wall < stop_wall or (best is not None and wall < _wall(best, self.zone) - _MARGIN):
                return best
            for t in self._instants(wall):
                if t <= at_or_before and (best is None or t > best):
                    best = t


def _wall(t: float, zone: ZoneInfo) -> datetime:
    """The zone's wall time at an instant, naive."""
    return datetime.fromtimestamp(t, zone).replace(tzinfo=None)


def _wall_ts(wall: datetime, zone: ZoneInfo) -> float:
    return wall.replace(tzinfo=zone).timestamp()


def _jump_end(wall: datetime, zone: ZoneInfo) -> float:
    """The instant a forward jump over ``wall`` lands on: the first instant whose wall time
    is past ``wall``."""
    lo = wall.replace(tzinfo=zone, fold=1).timestamp()  # the earlier of the two readings
    hi = wall.replace(tzinfo=zone, fold=0).timestamp()
    lo, hi = min(lo, hi), max(lo, hi)
    # the offset changes somewhere in [lo, hi]; find it to the second
    while hi - lo > 1:
        mid = math.floor((lo + hi) / 2)
        if _wall(mid, zone) > wall:
            hi = mid
        else:
            lo = mid
    return float(hi)


@dataclass(frozen=True, slots=True)
class TickPlan:
    """What a pass does with a schedule's due ticks."""

    submit: tuple[float, ...]  # ticks to submit a job for, ascending
    skipped: int  # due ticks handled without a job (missed, or overlapping)
    last: float  # the latest tick handled: the next pass starts after it


def plan(
    cron: Cron,
    last: float,
    now: float,
    *,
    catch_up: CatchUp = "latest",
    overlap: Overlap = "allow",
    grace_s: float = 60.0,
    previous_running: bool = False,
) -> TickPlan:
    """The ticks of ``(last, now]`` to submit under the schedule's policies."""
    if catch_up not in CATCH_UP or overlap not in OVERLAP:
        raise ScheduleError(f"catch_up {catch_up!r} / overlap {overlap!r} not known")
    cutoff = now - grace_s  # ticks at or before it were missed
    if cutoff <= last:  # nothing missed: the usual pass
        return _finish(cron.ticks(last, now), 0, last, overlap, previous_running)
    if catch_up == "all":
        missed = cron.ticks(last, cutoff)
        if len(missed) == MAX_TICKS_PER_PASS:  # more wait: the next pass goes on from here
            return _finish(missed, 0, missed[-1], overlap, previous_running)
        return _finish(missed + cron.ticks(cutoff, now), 0, cutoff, overlap, previous_running)
    on_time = cron.ticks(cutoff, now)
    newest = cron.latest(cutoff)
    if newest is None or newest <= last:  # nothing was missed after all
        return _finish(on_time, 0, cutoff, overlap, previous_running)
    n_missed = len(cron.ticks(last, newest, limit=COUNT_LIMIT))
    if catch_up == "latest" and not on_time:
        return _finish([newest], n_missed - 1, cutoff, overlap, previous_running)
    return _finish(on_time, n_missed, cutoff, overlap, previous_running)


def _finish(
    due: list[float], skipped: int, floor: float, overlap: Overlap, previous_running: bool
) -> TickPlan:
    """The plan for ``due`` ticks; ``last`` becomes the latest of them, or ``floor``."""
    end = max(due[-1], floor) if due else floor
    if overlap == "skip" and due:
        if previous_running:
            return TickPlan((), skipped + len(due), end)
        return TickPlan((due[-1],), skipped + len(due) - 1, end)
    return TickPlan(tuple(due), skipped, end)


def tick_job_id(name: str, tick: float) -> str:
    """The job id of a schedule's tick: the same for every scheduler and every retry."""
    stamp = datetime.fromtimestamp(tick, UTC)
    text = stamp.strftime("%Y-%m-%dT%H:%M:%S")
    frac = tick - math.floor(tick)
    if frac:
        text += f".{round(frac * 1e6):06d}"
    return f"schedule:{name}:{text}Z"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ScheduleError(
            f"schedule name {name!r}: 1–100 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


__all__ = [
    "CATCH_UP",
    "OVERLAP",
    "CatchUp",
    "Cron",
    "Overlap",
    "ScheduleError",
    "TickPlan",
    "check_name",
    "plan",
    "tick_job_id",
]
