"""Rate limits held where they matter: at the moment jobs *start*.

A limit of N per window W means no half-open window ``(t − W, t]`` holds more than N
starts of the key's jobs. Admission alone cannot promise that: a dispatch starts after a
delay that varies (the broker, a busy worker, a slot still taken), so admissions spread
evenly can start in a bunch. The rule here gives each admission a *not-before* instant that
the worker honours (it starts the job no earlier), computed from the starts already known:

- number a key's admissions 1, 2, … in the order they are made, and let ``s_j`` be the start
  of admission ``j`` (an attempt that ends without starting has none);
- admission ``i`` may be made only once every admission ``j ≤ i − N`` is *resolved* (started,
  or ended unstarted): at most N − 1 of a key's admissions are unresolved at any time;
- its not-before is ``W + max(s_j : j ≤ i − N)`` (no bound when none started), rounded up
  so that ``not_before − W ≥ s_j`` holds in floating point too.

Why no window ever holds N + 1 starts: take any N + 1 starts, of admissions
``a_0 < … < a_N``. Then ``a_0 ≤ a_N − N``, so ``s_{a_N} ≥ W + s_{a_0}``: the first and the
last are W or more apart and cannot share a half-open window of length W. Starts in any
order, after any delay, on any number of workers: only "no start before its not-before" is
assumed (the workers' clocks agree; a skew between them adds to the bound).

Utilisation: in a steady flow ``s_i = s_{i−N} + W``, N starts per window, as long as a start
is reported and the next admission dispatched within W.

Pure: no I/O, no clock (times are arguments), stdlib only.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence

Ref = Hashable  # one attempt: (job id, attempt)

UNSTARTED = math.nan  # an attempt that ended without starting
_OLDER = object()  # stands for older unresolved entries of a log read from PostgreSQL


def window_end(t: float, window_s: float) -> float:
    """The first float x with x - window_s >= t: when an admission at t leaves the window.
    (t + window_s alone can round down by one ulp; the check is ``x - W >= t`` everywhere.)"""
    x = t + window_s
    while x - window_s < t:
        x = math.nextafter(x, math.inf)
    return x


class StartLog:
    """One key's admissions in order, with their starts once known.

    ``entries`` holds every admission that still matters: the latest N − 1 (they do not bind
    the next admission yet) and any unresolved older one; resolved older ones are folded
    into ``floor``, the latest start among them."""

    __slots__ = ("entries", "floor")

    def __init__(self) -> None:
        self.entries: deque[list[object]] = deque()  # [ref, start | None | UNSTARTED]
        self.floor = -math.inf

    def _fold(self, limit: int) -> None:
        e = self.entries
        while len(e) > limit - 1 and e[0][1] is not None:
            start = e[0][1]
            assert isinstance(start, float)
            if not math.isnan(start) and start > self.floor:
                self.floor = start
            e.popleft()

    def not_before(self, limit: int, window_s: float) -> float | None:
        """The not-before of one more admission, ``-inf`` when nothing binds it, or
        ``None`` while an admission it depends on has not started or ended."""
        self._fold(limit)
        if len(self.entries) > limit - 1:
            return None
        return self.floor if self.floor == -math.inf else window_end(self.floor, window_s)

    def admit(self, ref: Ref) -> None:
        self.entries.append([ref, None])

    def resolve(self, ref: Ref, start: float) -> bool:
        """Record an admission's start (``UNSTARTED``: it ended without one). False when the
        admission is not (or no longer) in the log: it was folded, or never made here."""
        for entry in self.entries:
            if entry[0] == ref:
                if entry[1] is None:  # the first word on an attempt stands
                    entry[1] = start
                return True
        return False

    def unresolved(self) -> list[Ref]:
        return [ref for ref, start in self.entries if start is None]

    @classmethod
    def of(
        cls,
        recent: Sequence[tuple[Ref, float | None]],
        older_floor: float,
        older_resolved: bool,
    ) -> StartLog:
        """A log as the durable one holds it: the latest entries newest first, the latest
        start of the older ones, and whether they are all resolved (if not, one unresolved
        entry stands for them until the log is read again)."""
        log = cls()
        log.floor = older_floor
        if not older_resolved:
            log.entries.append([_OLDER, None])
        for ref, start in reversed(recent):
            log.entries.append([ref, start])
        return log


def batch_not_before(
    recent: Sequence[float | None],
    older_floor: float,
    older_resolved: bool,
    limit: int,
    window_s: float,
) -> list[float]:
    """The not-befores of the next admissions of one key made together (one transaction),
    from what the durable log holds: ``recent``, its latest entries newest first (at most
    ``limit``; each a start, ``UNSTARTED`` or ``None`` while unresolved), and of the older
    ones the latest start (``older_floor``) and whether all are resolved. Entry ``m`` of
    the result is the not-before of the ``m``-th admission (``-inf``: unbound); the list
    stops at the first admission that must wait for a start (the same answers as a
    :class:`StartLog` holding the same entries, asked before each admission)."""
    out: list[float] = []
    full = len(recent) >= limit
    for m in range(limit):
        bound = recent[limit - m - 1 :]
        if any(s is None for s in bound) or (full and not older_resolved):
            break
        floor = older_floor if full else -math.inf
        for s in bound:
            assert s is not None
            if s > floor:  # False for UNSTARTED (NaN)
                floor = s
        out.append(floor if floor == -math.inf else window_end(floor, window_s))
    return out


Keys = Sequence[tuple[str, int, float]]  # (key, limit, window_s), as ``RateLimiter.keys``


class StartLimiter:
    """The start logs of every limited key, and which keys each admitted attempt counts
    against (so a start, reported with only its attempt, reaches its logs)."""

    def __init__(self) -> None:
        self.logs: dict[str, StartLog] = {}
        self.keys_of: dict[Ref, tuple[str, ...]] = {}

    def not_before(self, keys: Keys) -> tuple[float | None, str]:
        """The not-before of one more admission against all ``keys`` (``-inf``: unbound),
        and the binding key; ``(None, key)`` while ``key`` waits for a start."""
        best, which = -math.inf, ""
        for key, limit, window in keys:
            log = self.logs.get(key)
            if log is None:
                continue
            nb = log.not_before(limit, window)
            if nb is None:
                return None, key
            if nb > best:
                best, which = nb, key
        return best, which

    def admit(self, ref: Ref, keys: Keys) -> None:
        names = tuple(k for k, _, _ in keys)
        if not names:
            return
        self.keys_of[ref] = names
        for key in names:
            log = self.logs.get(key)
            if log is None:
                log = self.logs[key] = StartLog()
            log.admit(ref)

    def started(self, ref: Ref, at: float) -> None:
        self._resolve(ref, at)

    def ended_unstarted(self, ref: Ref) -> None:
        self._resolve(ref, UNSTARTED)

    def _resolve(self, ref: Ref, start: float) -> None:
        for key in self.keys_of.pop(ref, ()):
            log = self.logs.get(key)
            if log is not None:
                log.resolve(ref, start)

    def replace(self, key: str, log: StartLog) -> None:
        """Put a log read from the durable one in place of the key's (its unresolved
        admissions are then the ones a reported start resolves)."""
        old = self.logs.get(key)
        for ref in old.unresolved() if old is not None else ():
            names = tuple(k for k in self.keys_of.get(ref, ()) if k != key)
            if names:
                self.keys_of[ref] = names
            else:
                self.keys_of.pop(ref, None)
        self.logs[key] = log
        for ref in log.unresolved():
            if ref is not _OLDER:
                self.keys_of[ref] = (*self.keys_of.get(ref, ()), key)
