"""Which dispatches' offsets the group has confirmed as committed, and who waits for that.

A dispatch that holds a shared resource runs only once its offset is committed: otherwise a
rebalance (a commit refused with ``ILLEGAL_GENERATION`` while partitions move) hands the same
attempt to the partition's next owner after it ran here, and that second run holds nothing
(measured in ``make chaos``: three processes on a resource of two).

Invariants:
- A wait resolves True once a commit covering its offset is confirmed (a committed position
  is the next offset to read, so it covers every offset below it), False when its partition
  leaves this worker first (its next owner runs the dispatch) or the worker gives up.
- In a share group there are no positions: a wait resolves with the broker's answer to the
  acknowledgement of its own record (False: the record's lock had passed, so another worker
  may hold it now).
- Loop thread only: the consumer's callbacks hand their results over with
  ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from functools import partial

TP = tuple[str, int]
ANSWERS_KEPT = 10_000


class CommitWaits:
    def __init__(self) -> None:
        self._committed: dict[TP, int] = {}
        self._waiting: dict[TP, list[tuple[int, asyncio.Future[bool]]]] = {}
        # share groups: answers that came before anyone waited (the latest few)
        self._answered: OrderedDict[tuple[TP, int], bool] = OrderedDict()

    def wait(self, tp: TP, offset: int) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        answer = self._answered.pop((tp, offset), None)
        if answer is not None:  # a share group's answer came first
            fut.set_result(answer)
        elif self._committed.get(tp, -1) > offset:
            fut.set_result(True)
        else:
            self._waiting.setdefault(tp, []).append((offset, fut))
        return fut

    def committed(self, positions: Iterable[tuple[TP, int]]) -> None:
        """Commits the broker confirmed: partition → committed position."""
        for tp, position in positions:
            if position <= self._committed.get(tp, -1):
                continue
            self._committed[tp] = position
            self._answer(tp, partial(_below, position))

    def acknowledged(self, tp: TP, offsets: Collection[int], ok: bool) -> None:
        """The broker's answer to acknowledging these records of ``tp`` (share groups)."""
        answered = self._answered
        for offset in offsets:
            answered[(tp, offset)] = ok
        while len(answered) > ANSWERS_KEPT:
            answered.popitem(last=False)
        self._answer(tp, lambda offset: ok if offset in offsets else None)

    def _answer(self, tp: TP, answer: Callable[[int], bool | None]) -> None:
        """Settle the waits of ``tp`` that ``answer(offset)`` answers (None: not yet)."""
        waiting = self._waiting.get(tp)
        if not waiting:
            return
        keep = []
        for offset, fut in waiting:
            got = answer(offset)
            if got is None:
                keep.append((offset, fut))
            else:
                _settle(fut, got)
        if keep:
            self._waiting[tp] = keep
        else:
            del self._waiting[tp]

    def abandon(self, tps: Iterable[TP]) -> None:
        """These partitions left this worker: what still waits is their next owner's."""
        for tp in tps:
            self._committed.pop(tp, None)
            for _, fut in self._waiting.pop(tp, ()):
                _settle(fut, False)

    def abandon_all(self) -> None:
        self.abandon(list({*self._waiting, *self._committed}))

    def __len__(self) -> int:
        return sum(len(w) for w in self._waiting.values())


def _below(position: int, offset: int) -> bool | None:
    """A committed position covers every offset below it (the rest: not yet)."""
    return True if offset < position else None


def _settle(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)
