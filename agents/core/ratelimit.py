"""Rate limits: a sliding-window log.

A limit of N per window W applies to a key:
``tenant:T``, ``kind:K``, ``tenant_kind:T/K`` or ``global``. A job may be admitted at time x
only if fewer than N admissions of each of its keys lie in (x − W, x]; hence no half-open
window (s, s + W] ever holds more than N. The log of a key keeps its latest N admission times
only (older ones can never matter again): memory is O(N) per key. A denied job is told the time
it may next run (the N-th latest admission + W); it holds nothing meanwhile.

The same limit holds at the jobs' *starts* too (``agents.core.startlimit``): ``next_allowed``
is infinite while the key's next admission waits for an earlier one's start, and no earlier
than ``START_LEAD_S`` before the not-before instant its worker will hold it to: a dispatch
waits at admission, where it holds nothing, rather than in a worker's buffer.

Pure: no I/O, no clock (``now`` is an argument), stdlib only.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from agents.core.startlimit import StartLimiter, window_end

Scope = Literal["tenant", "kind", "tenant_kind", "global"]


@dataclass(frozen=True, slots=True)
class Limit:
    """N admissions per ``window_s``. ``match`` names a tenant, a kind, ``tenant/kind`` or is
    ``*`` (every tenant / kind / pair counted on its own); an exact match overrides ``*``."""

    scope: Scope
    limit: int
    window_s: float
    match: str = "*"


class WindowLog:
    """Latest admission times of one key (ascending; at most the largest limit kept)."""

    __slots__ = ("times",)

    def __init__(self) -> None:
        self.times: deque[float] = deque()

    def next_allowed(self, now: float, limit: int, window_s: float) -> float:
        t = self.times
        if len(t) < limit or now - window_s >= t[-limit]:
            return now
        return window_end(t[-limit], window_s)

    def record(self, at: float, keep: int) -> None:
        t = self.times
        t.append(at)
        while len(t) > keep:
            t.popleft()


# how long before its not-before instant a dispatch is admitted: enough for it to reach its
# worker (admission → broker → worker is ~5–50 ms here), little of a worker's buffer held
START_LEAD_S = 0.1


class RateLimiter:
    def __init__(self, limits: Iterable[Limit] = ()) -> None:
        self.logs: dict[str, WindowLog] = {}
        self.starts = StartLimiter()
        self.set_limits(limits)

    def set_limits(self, limits: Iterable[Limit]) -> None:
        self.exact: dict[tuple[str, str], Limit] = {}
        self.any: dict[str, Limit] = {}
        for lim in limits:
            if lim.limit < 1 or lim.window_s <= 0:
                raise ValueError(f"invalid limit {lim}")
            if lim.match == "*" or lim.scope == "global":
                self.any[lim.scope] = lim
            else:
                self.exact[(lim.scope, lim.match)] = lim
        self._cache: dict[tuple[str, str], tuple[tuple[str, int, float], ...]] = {}
        self._names: dict[tuple[tuple[str, int, float], ...], tuple[str, ...]] = {}

    def keys(self, tenant: str, kind: str) -> tuple[tuple[str, int, float], ...]:
        """(key, limit, window) of every limit that applies to a job of tenant and kind."""
        ck = (tenant, kind)
        hit = self._cache.get(ck)
        if hit is not None:
            return hit
        out = []
        for scope, match in (
            ("tenant", tenant),
            ("kind", kind),
            ("tenant_kind", f"{tenant}/{kind}"),
            ("global", ""),
        ):
            lim = self.exact.get((scope, match)) or self.any.get(scope)
            if lim is not None:
                key = f"{scope}:{match}" if scope != "global" else "global"
                out.append((key, lim.limit, lim.window_s))
        res = tuple(out)
        self._cache[ck] = res
        return res

    def names(self, keys: tuple[tuple[str, int, float], ...]) -> tuple[str, ...]:
        """The key names of ``keys`` (a result of ``keys``), shared between calls."""
        hit = self._names.get(keys)
        if hit is None:
            hit = self._names[keys] = tuple([k for k, _, _ in keys])
        return hit

    def limit_of(self, key: str) -> Limit | None:
        """The limit that governs ``key`` (as built by ``keys``), if any."""
        if key == "global":
            return self.any.get("global")
        scope, _, match = key.partition(":")
        return self.exact.get((scope, match)) or self.any.get(scope)

    def horizon(self) -> float:
        """The longest window of any limit: older admissions never matter."""
        return max((x.window_s for x in (*self.exact.values(), *self.any.values())), default=0.0)

    def next_allowed(self, keys: Sequence[tuple[str, int, float]], now: float) -> tuple[float, str]:
        """The earliest time all ``keys`` allow one more admission, and the binding key
        (``inf``: not before a start reported, or a log read again)."""
        nb, key = self.starts.not_before(keys)
        if nb is None:
            return math.inf, key
        best, which = now, ""
        if nb - START_LEAD_S > now:
            best, which = nb - START_LEAD_S, key
        logs = self.logs
        for key, limit, window in keys:
            log = logs.get(key)
            if log is None:
                continue
            t = log.next_allowed(now, limit, window)
            if t > best:
                best, which = t, key
        return best, which

    def record(self, keys: Sequence[tuple[str, int, float]], at: float, ref: object = None) -> None:
        """An admission at ``at`` (``ref``: its job, whose start is reported by id)."""
        for key, limit, _ in keys:
            log = self.logs.get(key)
            if log is None:
                log = self.logs[key] = WindowLog()
            log.record(at, limit)
        if ref is not None:
            self.starts.admit(ref, keys)

    def load(self, key: str, times: Iterable[float], keep: int) -> None:
        """Replace a key's log (rebuilt from the durable admission log)."""
        log = self.logs[key] = WindowLog()
        for at in sorted(times):
            log.record(at, keep)
