"""Semaphores: what a job needs and what is free.

A job needs a set of (name, amount): ``slots`` (worker capacity, 1 each),
``kind:K`` when its kind has a concurrency maximum, named resources, and ``*`` (1 each, the
global scope). An exclusive job needs the whole capacity of its scope (a resource or ``*``). A
job is admitted only when every amount fits at once (all or nothing: no job ever holds part
of what it needs, so no deadlock), and usage never exceeds capacity. A job that is *due*
(its due time passed) and blocked on resources other than ``slots`` reserves them: no job
after it in the round may take them, so capacity drains towards it and it cannot starve.

Pure: no I/O, stdlib only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

SLOTS = "slots"

GLOBAL = "*"

GLOBAL_CAPACITY = 1_000_000

ALL = -1  # a need of ALL takes the whole capacity of its name (an exclusive job)

Need = tuple[str, int]


class Semaphores:
    def __init__(self, capacity: Mapping[str, int] | None = None) -> None:
        self.capacity: dict[str, int] = {GLOBAL: GLOBAL_CAPACITY, **(capacity or {})}
        self.used: dict[str, int] = {}

    def blocking(self, needs: Iterable[Need]) -> str | None:
        """The first name whose free capacity is below the need, or None if all fit."""
        cap, used = self.capacity, self.used
        for name, amount in needs:
            c = cap.get(name)
            if c is None or used.get(name, 0) + (c if amount == ALL else amount) > c:
                return name
        return None

    def resolve(self, needs: Iterable[Need]) -> tuple[Need, ...]:
        cap = self.capacity
        return tuple((n, cap[n] if a == ALL else a) for n, a in needs)

    def take(self, needs: Iterable[Need]) -> None:
        for name, amount in needs:
            self.used[name] = self.used.get(name, 0) + amount

    def release(self, needs: Iterable[Need]) -> None:
        for name, amount in needs:
            self.used[name] = max(0, self.used.get(name, 0) - amount)


_NEEDS_CACHE: dict[tuple[str, tuple[str, ...], str | None, bool, int], tuple[Need, ...]] = {}

_AMOUNT_CACHE: dict[tuple[tuple[Need, ...], str, int], tuple[Need, ...]] = {}


def with_amount(needs: tuple[Need, ...], name: str, amount: int) -> tuple[Need, ...]:
    """``needs`` with ``amount`` of ``name`` instead of what it had (shared tuples)."""
    key = (needs, name, amount)
    hit = _AMOUNT_CACHE.get(key)
    if hit is None:
        hit = tuple((n, amount if n == name else a) for n, a in needs)
        if hit == needs:
            hit = needs
        if len(_AMOUNT_CACHE) < 10_000:
            _AMOUNT_CACHE[key] = hit
    return hit


def needs_for(
    kind: str,
    resources: Sequence[str],
    exclusive: str | None,
    kind_limited: bool,
    slot_units: int = 1,
) -> tuple[Need, ...]:
    """What a job takes: ``slot_units`` of the slots (its expected work: ``agents.core.depth``),
    its kind's semaphore if limited, its resources (1 each) and the global scope; an exclusive
    job the whole of its scope (ALL) instead of 1. Equal needs share one tuple (memory per
    queued job)."""
    key = (kind, tuple(resources), exclusive, kind_limited, slot_units)
    hit = _NEEDS_CACHE.get(key)
    if hit is not None:
        return hit
    needs: dict[str, int] = {SLOTS: slot_units, GLOBAL: 1}
    if kind_limited:
        needs[f"kind:{kind}"] = 1
    for r in resources:
        needs[r] = 1
    if exclusive is not None:
        needs[exclusive] = ALL
    out = tuple(sorted(needs.items()))
    if len(_NEEDS_CACHE) < 10_000:
        _NEEDS_CACHE[key] = out
    return out
