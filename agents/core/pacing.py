"""When a batched send may go: at once while the load is light, at a bounded rate under load.

Every Kafka request costs the sender ~50-90 µs of CPU however small it is (one message, one
partition; measured in docs/performance.md), so a worker that sends each job's events and
offset commits on their own spends most of its CPU on requests. :class:`Pacer` is a token
bucket over *sends* (not messages): a send goes at once while tokens remain (light load, or
the first sends of a burst: no added latency), and once they are used up the next send waits
until a token is back, carrying everything queued meanwhile. Under a flood the requests per
second are bounded by ``rate`` whatever the job rate, and a message waits at most
``1 / rate`` s plus its round trip.

Pure: the caller passes the clock. Invariants (property-tested in tests/unit/test_pacing.py):
over any interval of length ``t`` at most ``burst + rate * t`` sends are allowed; a send that
is told to wait ``d`` is allowed at ``now + d``; with no sends for ``burst / rate`` s the bucket
is full again.
"""

from __future__ import annotations


class Pacer:
    __slots__ = ("rate", "burst", "_tokens", "_at")

    def __init__(self, rate_per_s: float, burst: float) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a pacer needs a positive rate and a burst of at least 1")
        self.rate = rate_per_s
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at: float | None = None  # when ``_tokens`` was last brought up to date

    def _refill(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        if self._at is None or now > self._at:
            self._at = now

    def wait(self, now: float) -> float:
        """Seconds until a send may go (0: now). Does not use a token."""
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate

    def take(self, now: float) -> bool:
        """Use a token for a send at ``now``; False (and nothing used) when none is there."""
        self._refill(now)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
