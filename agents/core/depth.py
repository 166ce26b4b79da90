"""How deep admission fills the pipeline: in-flight capacity counted in expected work.

A worker slot stands for ``UNITS`` capacity units in the ``slots`` semaphore (times
``capacity_factor``, as before). A job whose kind runs for ``horizon_s`` or longer, or whose
kind has not been seen to finish yet, takes all ``UNITS`` of a slot: long work is committed to
workers no earlier than it used to be (``capacity_factor`` jobs per slot). A shorter job takes
its share of the horizon, rounded up to a power of two and at least one unit: no-ops get a deep
pipeline (up to ``UNITS`` × ``capacity_factor`` per slot, enough to cover the round trips
between a job's end and the next dispatch) and 0.5 s chunks a shallow one. A job admitted
behind the pipeline waits at most about ``capacity_factor`` × ``horizon_s`` of expected work
per slot.

Pure: durations come from the callers (reported by workers), no clock, no I/O.

Invariants (property-tested in tests/unit/test_depth.py):
- ``units`` is a power of two in [1, UNITS]; it never decreases as the expected duration
  grows; it is ``UNITS`` when the duration is unknown or at least the horizon.
- An estimate moves toward each observation and stays within the range of what was observed.
- A kind's units change only when its estimate is ``HYSTERESIS`` past the boundary, and
  then toward the units the estimate alone would give.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

UNITS = 64  # capacity units per worker slot
ALPHA = 0.2  # weight of a new observation in a kind's running estimate
HYSTERESIS = 1.5  # how far past a boundary an estimate moves before a kind's units change


def units_for(expected_s: float | None, horizon_s: float) -> int:
    """The units of a slot a job of ``expected_s`` seconds takes."""
    if expected_s is None or horizon_s <= 0 or expected_s >= horizon_s:
        return UNITS
    share = max(1.0, UNITS * max(0.0, expected_s) / horizon_s)
    return min(UNITS, 1 << math.ceil(math.log2(share)))


class WorkEstimates:
    """Each kind's expected run time: an exponentially weighted mean of reported durations
    (a batch's mean counts as one observation per job in it)."""

    __slots__ = ("horizon_s", "_mean", "_units")

    def __init__(self, horizon_s: float, seed: Mapping[str, float] | None = None) -> None:
        self.horizon_s = horizon_s
        self._mean: dict[str, float] = {}
        self._units: dict[str, int] = {}
        for kind, seconds in (seed or {}).items():
            self._mean[kind] = max(0.0, seconds)
            self._units[kind] = units_for(self._mean[kind], horizon_s)

    def expected(self, kind: str) -> float | None:
        return self._mean.get(kind)

    def units(self, kind: str) -> int:
        return self._units.get(kind, UNITS)

    def _with_hysteresis(self, kind: str, mean: float) -> int:
        """The units for ``mean``, changed from the current ones only when the estimate is
        clear of the boundary by ``HYSTERESIS`` (a kind near a boundary would otherwise flip
        between two amounts, re-costing its queued jobs each time)."""
        current = self._units.get(kind)
        u = units_for(mean, self.horizon_s)
        if current is None or u == current:
            return u
        if u > current:
            return max(current, units_for(mean / HYSTERESIS, self.horizon_s))
        return min(current, units_for(mean * HYSTERESIS, self.horizon_s))

    def observe(self, durations: Iterable[tuple[str, float]]) -> set[str]:
        """Take reported (kind, seconds); the kinds whose units changed."""
        changed: set[str] = set()
        for kind, seconds in durations:
            x = max(0.0, seconds)
            old = self._mean.get(kind)
            self._mean[kind] = x if old is None else old + ALPHA * (x - old)
            u = self._with_hysteresis(kind, self._mean[kind])
            if u != self.units(kind):
                changed.add(kind)
            self._units[kind] = u
        return changed
