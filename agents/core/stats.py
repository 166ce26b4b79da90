"""Percentiles as the benchmarks and the demo report them (pure, stdlib only)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def pct(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100), nearest rank; None without values."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def ms(x: float | None, digits: int = 2) -> float | None:
    """Seconds as milliseconds, rounded (None stays None)."""
    return None if x is None else round(x * 1000, digits)
