"""The host-load brake: additive increase, multiplicative decrease of admission's slot
capacity from host telemetry (pure: no I/O, no clock).

Each step looks at the fresh samples (one per host). If any host is over a threshold the
target is cut (``× decrease``, at least ``floor``); otherwise it grows by ``step`` until it
reaches the static capacity again. With no fresh sample at all the brake lets go: the static
capacity applies (telemetry that stops must never freeze the scheduler).

Invariants (property-tested): the target stays within [floor, static]; it never rises while a
host is overloaded and never falls while none is; without fresh samples it equals static.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HostSample:
    host: str
    at: float
    cpu_busy_pct: float | None = None  # 100 - usage_idle
    load_per_cpu: float | None = None  # load1 / n_cpus
    mem_used_pct: float | None = None


@dataclass(frozen=True, slots=True)
class Thresholds:
    cpu_busy_pct: float = 90.0
    load_per_cpu: float = 2.0
    mem_used_pct: float = 95.0
    decrease: float = 0.5
    step: int = 1
    floor: int = 1
    stale_after_s: float = 30.0


@dataclass(frozen=True, slots=True)
class BrakeState:
    target: int | None  # None: no brake, the static capacity applies
    reason: str = ""


def overload(sample: HostSample, t: Thresholds) -> str | None:
    """Why this host is overloaded, or None."""
    if sample.cpu_busy_pct is not None and sample.cpu_busy_pct >= t.cpu_busy_pct:
        return f"{sample.host} cpu {sample.cpu_busy_pct:.0f}% busy"
    if sample.load_per_cpu is not None and sample.load_per_cpu >= t.load_per_cpu:
        return f"{sample.host} load {sample.load_per_cpu:.1f} per cpu"
    if sample.mem_used_pct is not None and sample.mem_used_pct >= t.mem_used_pct:
        return f"{sample.host} memory {sample.mem_used_pct:.0f}% used"
    return None


def step(
    state: BrakeState, static: int, samples: Iterable[HostSample], now: float, t: Thresholds
) -> BrakeState:
    fresh = [s for s in samples if now - s.at <= t.stale_after_s]
    if not fresh or static <= 0:
        return BrakeState(None, "no fresh host telemetry" if not fresh else "")
    reasons = [r for s in sorted(fresh, key=lambda s: s.host) if (r := overload(s, t))]
    current = static if state.target is None else min(state.target, static)
    floor = min(t.floor, static)
    if reasons:
        target = max(floor, math.floor(current * t.decrease))
        return BrakeState(target, "; ".join(reasons))
    target = min(static, current + t.step)
    return BrakeState(None if target >= static else target, "recovering" if target < static else "")
