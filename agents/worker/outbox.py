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
  with everything queued meanwhile (``agents.core.pacing``).
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


class Outbox:
    def __init__(self, producer: ConfirmedProducer, pacer: Pacer, timeout_s: float = 30.0) -> None:
        self.producer = producer
        self.pacer = pacer
        self.timeout_s = timeout_s
        self.batches = 0  # sends made (a send = one produce batch)
        self.records = 0
        self._queued: list[Record] = []
        self._told: list[_Delivery] = []
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
            asyncio.get_running_loop().call_soon(self._flush)
        elif not self._scheduled:
            self._scheduled = True
            wait = self.pacer.wait(time.monotonic())
            if wait <= 0:  # with the rest of this loop turn's records
                asyncio.get_running_loop().call_soon(self._flush)
            else:
                asyncio.get_running_loop().call_later(wait, self._flush)

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

    def _flush(self) -> None:
        urgent, self._urgent = self._urgent, False
        if not urgent:
            self._scheduled = False
        if not self._queued:
            return
        now = time.monotonic()
        if urgent:
            self.pacer.take(now)  # counts against the rate when a token is there
        elif not self.pacer.take(now):  # a token went elsewhere meanwhile: wait for the next
            self._scheduled = True
            asyncio.get_running_loop().call_later(self.pacer.wait(now), self._flush)
            return
        self._send_queued()

    def _send_queued(self) -> None:
        """Everything queued, as one produce batch (no task: the producer calls back)."""
        records, told = self._queued, self._told
        self._queued, self._told = [], []
        self.batches += 1
        self.records += len(records)
        self._inflight += 1
        self.producer.produce_then(records, partial(self._settle, told), self.timeout_s)

    def _settle(self, told: list[_Delivery], result: dict[int, str] | DeliveryFailed) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        if isinstance(result, DeliveryFailed):
            for state in told:
                self._tried(state, result)
            return
        for i, state in enumerate(told):
            if i in result:
                self._tried(state, DeliveryFailed(f"not delivered: {result[i]}"))
            elif not state.over:  # the common case, without a call more
                if state.delay:
                    log.warning("%s: delivered after retrying", state.what)
                state.over = True
                state.done(None)

    async def close(self) -> None:
        """Send what is queued now and wait for every send in flight."""
        if self._queued:
            self._send_queued()
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


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    elif isinstance(exc, asyncio.CancelledError):
        fut.cancel()
    else:
        fut.set_exception(exc)
