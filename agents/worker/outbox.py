"""Confirmed sends batched by load: each caller waits for its own record's confirmation, and
records queued while the pacer holds go out together in one produce batch.

Invariants:
- A record's caller learns once the broker confirmed that record, or that record's error,
  or the batch's when the batch as a whole was not confirmed in time (the caller retries; a
  record is never reported sent unconfirmed, and one bad record does not fail the records
  batched with it). The hot path (``then``, ``deliver_then``) is told by a callback, with
  no future per record; ``send`` and ``deliver`` wrap them in a future.
- A record queued while no send is pending goes out in the same loop turn when the pacer
  has a token (light load: no added latency); otherwise within the pacer's wait, together
  with everything queued meanwhile (``agents.core.pacing``). Outboxes that share a
  ``Sender`` (a worker's starts and outcomes) send what is due in one loop turn in one
  produce call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial

from agents.context import TRANSIENT
from agents.core.pacing import Pacer
from streams.errors import DeliveryFailed
from streams.kafka import ConfirmedProducer, Record

log = logging.getLogger("jobstream.outbox")
FIRST_RETRY_S = 0.2
MAX_RETRY_S = 15.0


Done = Callable[[BaseException | None], object]  # told a record's fate: None = confirmed


class Sender:
    """One produce call per loop turn for every outbox that shares it: a worker's starts and
    outcomes of one turn leave in one request (``ConfirmedProducer.produce_then``)."""

    def __init__(self, producer: ConfirmedProducer, timeout_s: float = 30.0) -> None:
        self.producer = producer
        self.timeout_s = timeout_s
        self.sends = 0  # produce calls made
        self.records = 0
        self._due: list[Outbox] = []

    def due(self, box: Outbox) -> None:
        """``box`` has records to go with this loop turn's send."""
        if not self._due:
            asyncio.get_running_loop().call_soon(self.flush)
        if box not in self._due:
            self._due.append(box)

    def flush(self) -> None:
        """Send what is due now (else at the end of this loop turn)."""
        boxes, self._due = self._due, []
        now = time.monotonic()
        records: list[Record] = []
        parts: list[tuple[Outbox, int, list[Record], list[_Told]]] = []
        for box in boxes:
            taken = box._take(now)
            if taken is not None:
                parts.append((box, len(records), *taken))
                records += taken[0]
        if not records:
            return
        self.sends += 1
        self.records += len(records)
        self.producer.produce_then(records, partial(self._settle, parts), self.timeout_s)

    @staticmethod
    def _settle(
        parts: list[tuple[Outbox, int, list[Record], list[_Told]]],
        result: dict[int, str] | DeliveryFailed,
    ) -> None:
        for box, first, records, told in parts:
            if isinstance(result, DeliveryFailed) or not result:
                box._settle(records, told, result)
            else:  # the failed records' indexes, as the box's own
                end = first + len(told)
                own = {i - first: e for i, e in result.items() if first <= i < end}
                box._settle(records, told, own)


class Outbox:
    def __init__(
        self,
        producer: ConfirmedProducer,
        pacer: Pacer,
        timeout_s: float = 30.0,
        *,
        sender: Sender | None = None,
    ) -> None:
        self.sender = sender or Sender(producer, timeout_s)
        self.pacer = pacer
        self.batches = 0  # sends this outbox took part in
        self.records = 0
        self._queued: list[Record] = []
        self._told: list[_Told] = []
        self._scheduled = False
        self._urgent = False
        self._inflight = 0  # sends not settled yet
        self._idle: asyncio.Future[None] | None = None  # ``close`` waits for them

    def then(self, record: Record, done: Done, *, urgent: bool = False) -> None:
        """Queue ``record``; ``done(error)`` once its send is settled (None: confirmed).
        ``urgent``: goes with this loop turn's send whatever the pacer says (and takes
        everything queued along), for records something waits on."""
        self._queue(_Delivery(record, "", done, retries=False), urgent)

    def send(self, record: Record, *, urgent: bool = False) -> asyncio.Future[None]:
        """:meth:`then` as a future."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.then(record, partial(_settle, fut), urgent=urgent)
        return fut

    def deliver_then(self, record: Record, what: str, done: Done) -> Callable[[], None]:
        """:meth:`then` until the broker has the record: a send that fails for a transient
        reason (the broker away, no confirmation in time) is sent again with backoff, as
        ``agents.context.retrying`` does. ``done(error)`` once delivered or given up for a
        lasting reason; the returned call gives up (``done`` is then not called)."""
        state = _Delivery(record, what, done, retries=True)
        self._queue(state, False)
        return state.give_up

    def put(self, record: Record, what: str, done: Done) -> None:
        """:meth:`deliver_then` without a way to give up: the hot path (no object per
        record until a send of it fails)."""
        self._queued.append(record)
        self._told.append((what, done))
        if not self._scheduled:
            self._schedule()

    def deliver(self, record: Record, what: str) -> asyncio.Future[None]:
        """:meth:`deliver_then` as a future; cancel it to give up."""
        out: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        give_up = self.deliver_then(record, what, partial(_settle, out))
        out.add_done_callback(lambda f: give_up() if f.cancelled() else None)
        return out

    def _queue(self, state: _Delivery, urgent: bool) -> None:
        self._queued.append(state.record)
        self._told.append(state)
        if urgent and not self._urgent:
            self._urgent = True
            self.sender.due(self)
        elif not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        self._scheduled = True
        wait = self.pacer.wait(time.monotonic())
        if wait <= 0:  # with the rest of this loop turn's records
            self.sender.due(self)
        else:
            asyncio.get_running_loop().call_later(wait, self.sender.due, self)

    def _requeue(self, state: _Delivery) -> None:
        if not state.over:
            self._queue(state, False)

    def _tried(self, state: _Delivery, exc: BaseException | None) -> None:
        if state.over:  # given up by the caller
            return
        if exc is None:
            if state.delay:
                log.warning("%s: delivered after retrying", state.what)
            state.finish(None)
        elif state.retries and isinstance(exc, TRANSIENT):
            if not state.delay:
                log.warning("%s: %s; retrying with backoff", state.what, exc)
            state.delay = min(MAX_RETRY_S, state.delay * 2) if state.delay else FIRST_RETRY_S
            asyncio.get_running_loop().call_later(state.delay, self._requeue, state)
        else:
            state.finish(exc)

    def _take(self, now: float) -> tuple[list[Record], list[_Told]] | None:
        """What goes with the sender's send now: everything queued, when the pacer has a
        token (an urgent record goes whatever it says); else None, and it is due again
        once a token is back."""
        urgent, self._urgent = self._urgent, False
        if not urgent:
            self._scheduled = False
        if not self._queued:
            return None
        if urgent:
            self.pacer.take(now)  # counts against the rate when a token is there
        elif not self.pacer.take(now):  # a token went elsewhere meanwhile: wait for the next
            self._scheduled = True
            asyncio.get_running_loop().call_later(self.pacer.wait(now), self.sender.due, self)
            return None
        records, told = self._queued, self._told
        self._queued, self._told = [], []
        self.batches += 1
        self.records += len(records)
        self._inflight += 1
        return records, told

    def _settle(
        self, records: list[Record], told: list[_Told], result: dict[int, str] | DeliveryFailed
    ) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        if isinstance(result, DeliveryFailed):
            for record, t in zip(records, told, strict=True):
                self._tried(_state(record, t), result)
            return
        for i, t in enumerate(told):
            if result and i in result:
                failed = DeliveryFailed(f"not delivered: {result[i]}")
                self._tried(_state(records[i], t), failed)
            elif isinstance(t, tuple):  # the common case: sent once, told at once
                t[1](None)
            elif not t.over:
                if t.delay:
                    log.warning("%s: delivered after retrying", t.what)
                t.over = True
                t.done(None)

    async def close(self) -> None:
        """Send what is queued now and wait for every send in flight."""
        if self._queued:
            self._urgent = True
            self.sender.due(self)
            self.sender.flush()
        if self._inflight:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle


class _Delivery:
    """One record on its way: once (``Outbox.then``) or until delivered (``deliver_then``)."""

    __slots__ = ("record", "what", "done", "retries", "delay", "over")

    def __init__(self, record: Record, what: str, done: Done, *, retries: bool) -> None:
        self.record, self.what, self.done, self.retries = record, what, done, retries
        self.delay = 0.0
        self.over = False

    def finish(self, exc: BaseException | None) -> None:
        self.over = True
        self.done(exc)

    def give_up(self) -> None:
        self.over = True


_Told = _Delivery | tuple[str, Done]  # a record on its way; a tuple: ``put``, not sent before


def _state(record: Record, told: _Told) -> _Delivery:
    """A record's way as an object (made when a send of a ``put`` record failed)."""
    if isinstance(told, _Delivery):
        return told
    return _Delivery(record, told[0], told[1], retries=True)


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    elif isinstance(exc, asyncio.CancelledError):
        fut.cancel()
    else:
        fut.set_exception(exc)
