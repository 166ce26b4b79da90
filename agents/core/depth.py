"""How deep admission fills the pipeline: in-flight capacity counted in expected work.

A worker slot stands for ``UNITS`` × ``capacity_factor`` capacity units in the ``slots``
semaphore: ``capacity_factor`` × ``horizon_s`` seconds of expected work per slot. A job takes
the units of its kind's expected run time (a share of the horizon, ``UNITS`` per
``horizon_s``), at most a whole slot's ``most`` (``UNITS`` × ``capacity_factor``), at least
one unit; a kind not seen finishing yet takes ``UNITS``. So no-ops get a deep pipeline (up to
``most`` per slot, enough to cover the round trips between a job's end and the next
dispatch), while work as long as a slot's whole budget is committed one per slot: a worker
never holds long work buffered behind its running jobs, and a small job admitted when a slot
frees is the next to start there, not behind chunks already sent (the ``fairness`` bench).
Below ``UNITS`` shares are powers of two; above, multiples of ``UNITS`` / 8.

Pure: durations come from the callers (reported by workers), no clock, no I/O.

Invariants (property-tested in tests/unit/test_depth.py):
- ``units`` is in [1, ``most``]; a power of two below ``UNITS``; it never decreases as the
  expected duration grows; it is ``UNITS`` when the duration is unknown, ``most`` when the
  duration is at least the slot's budget.
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


def slot_units(capacity_factor: float) -> int:
    """A worker slot's units: its budget of ``capacity_factor`` × the horizon."""
    return max(UNITS, int(UNITS * capacity_factor))


def units_for(expected_s: float | None, horizon_s: float, most: int = UNITS) -> int:
    """The units of a slot a job of ``expected_s`` seconds takes (``most``: a whole slot's)."""
    if expected_s is None or horizon_s <= 0:
        return UNITS
    share = UNITS * max(0.0, expected_s) / horizon_s
    if share >= most:
        return most
    if share > UNITS:
        step = UNITS // 8
        return min(most, step * math.ceil(share / step))
    return min(UNITS, 1 << math.ceil(math.log2(max(1.0, share))))


class WorkEstimates:
    """Each kind's expected run time: an exponentially weighted mean of reported durations
    (a batch's mean counts as one observation per job in it)."""

    __slots__ = ("horizon_s", "most", "_mean", "_units")

    def __init__(
        self, horizon_s: float, seed: Mapping[str, float] | None = None, most: int = UNITS
    ) -> None:
        self.horizon_s = horizon_s
        self.most = max(UNITS, most)  # a whole slot's units (``UNITS`` × capacity_factor)
        self._mean: dict[str, float] = {}
        self._units: dict[str, int] = {}
        for kind, seconds in (seed or {}).items():
            self._mean[kind] = max(0.0, seconds)
            self._units[kind] = units_for(self._mean[kind], horizon_s, self.most)

    def expected(self, kind: str) -> float | None:
        return self._mean.get(kind)

    def units(self, kind: str) -> int:
        return self._units.get(kind, UNITS)

    def _with_hysteresis(self, kind: str, mean: float) -> int:
        """The units for ``mean``, changed from the current ones only when the estimate is
        clear of the boundary by ``HYSTERESIS`` (a kind near a boundary would otherwise flip
        between two amounts, re-costing its queued jobs each time)."""
        current = self._units.get(kind)
        h, most = self.horizon_s, self.most
        u = units_for(mean, h, most)
        if current is None or u == current:
            return u
        if u > current:
            return max(current, units_for(mean / HYSTERESIS, h, most))
        return min(current, units_for(mean * HYSTERESIS, h, most))

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
