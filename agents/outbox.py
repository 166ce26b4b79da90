"""Confirmed sends batched by load: each caller waits for its own record's confirmation, and
records queued while the pacer holds go out together in one produce batch.

Invariants:
- ``send`` returns a future that resolves once the broker confirmed that record, or fails
  with that record's error, or the batch's when the batch as a whole was not confirmed in
  time (the caller retries; a record is never reported sent unconfirmed, and one bad record
  does not fail the records batched with it).
- A record queued while no send is pending goes out in the same loop turn when the pacer
  has a token (light load: no added latency); otherwise within the pacer's wait, together
  with everything queued meanwhile (``agents.core.pacing``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

from agents.context import TRANSIENT
from agents.core.pacing import Pacer
from streams.errors import DeliveryFailed
from streams.kafka import ConfirmedProducer, Record

log = logging.getLogger("jobstream.outbox")
FIRST_RETRY_S = 0.2
MAX_RETRY_S = 15.0


class Outbox:
    def __init__(self, producer: ConfirmedProducer, pacer: Pacer, timeout_s: float = 30.0) -> None:
        self.producer = producer
        self.pacer = pacer
        self.timeout_s = timeout_s
        self.batches = 0  # sends made (a send = one produce batch)
        self.records = 0
        self._queued: list[Record] = []
        self._waiting: list[asyncio.Future[None]] = []
        self._scheduled = False
        self._urgent = False
        self._inflight: set[asyncio.Task[dict[int, str]]] = set()

    def send(self, record: Record, *, urgent: bool = False) -> asyncio.Future[None]:
        """Queue ``record``; ``urgent``: goes with this loop turn's send whatever the pacer
        says (and takes everything queued along), for records something waits on."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queued.append(record)
        self._waiting.append(fut)
        if urgent and not self._urgent:
            self._urgent = True
            loop.call_soon(self._flush)
        elif not self._scheduled:
            self._scheduled = True
            wait = self.pacer.wait(time.monotonic())
            if wait <= 0:
                loop.call_soon(self._flush)  # with the rest of this loop turn's records
            else:
                loop.call_later(wait, self._flush)
        return fut

    def deliver(self, record: Record, what: str) -> asyncio.Future[None]:
        """:meth:`send` until the broker has the record: a send that fails for a transient
        reason (the broker away, no confirmation in time) is sent again with backoff, as
        ``agents.context.retrying`` does, without a task per record (hot: every job's
        events). Cancel the future to give up."""
        out: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._attempt(record, what, out, 0.0)
        return out

    def _attempt(self, record: Record, what: str, out: asyncio.Future[None], delay: float) -> None:
        if not out.done():
            self.send(record).add_done_callback(partial(self._tried, record, what, out, delay))

    def _tried(
        self,
        record: Record,
        what: str,
        out: asyncio.Future[None],
        delay: float,
        sent: asyncio.Future[None],
    ) -> None:
        if out.done():  # given up by the caller
            if not sent.cancelled():
                sent.exception()  # retrieved
            return
        if sent.cancelled():  # the loop is closing
            out.cancel()
            return
        exc = sent.exception()
        if exc is None:
            if delay:
                log.warning("%s: delivered after retrying", what)
            out.set_result(None)
        elif isinstance(exc, TRANSIENT):
            if not delay:
                log.warning("%s: %s; retrying with backoff", what, exc)
            wait = min(MAX_RETRY_S, delay * 2) if delay else FIRST_RETRY_S
            asyncio.get_running_loop().call_later(wait, self._attempt, record, what, out, wait)
        else:
            out.set_exception(exc)

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
        """Everything queued, as one produce batch."""
        records, waiting = self._queued, self._waiting
        self._queued, self._waiting = [], []
        self.batches += 1
        self.records += len(records)
        task = asyncio.ensure_future(self.producer.aproduce_each(records, self.timeout_s))
        self._inflight.add(task)
        task.add_done_callback(partial(self._settle, waiting))

    def _settle(
        self, waiting: list[asyncio.Future[None]], task: asyncio.Task[dict[int, str]]
    ) -> None:
        self._inflight.discard(task)
        if task.cancelled():  # the loop is closing
            for fut in waiting:
                fut.cancel()
            return
        exc = task.exception()
        failed = {} if exc is not None else task.result()
        for i, fut in enumerate(waiting):
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            elif i in failed:
                fut.set_exception(DeliveryFailed(f"not delivered: {failed[i]}"))
            else:
                fut.set_result(None)

    async def close(self) -> None:
        """Send what is queued now and wait for every send in flight."""
        if self._queued:
            self._send_queued()
        if self._inflight:
            await asyncio.wait(list(self._inflight))
