"""Metrics pushed to Telegraf (or InfluxDB) in line protocol: batched, never in the way.

    JOBSTREAM_METRICS_URL=udp://127.0.0.1:8094              Telegraf socket_listener (default
                                                            transport), one datagram per batch
    JOBSTREAM_METRICS_URL=http://127.0.0.1:8186/write?db=x  Telegraf http_listener_v2 or
                                                            InfluxDB 1.x /write

Callers record into memory (``count``, ``observe``, ``gauge``: a dict update, no I/O); a
daemon thread flushes every ``metrics_interval_s``: counters as totals since the process
started (so a lost datagram loses no counts, and ``non_negative_difference`` gives rates),
observations as count/sum/min/max/p50/p95/p99 of the interval, gauges as last values.

Invariants:
- Recording never blocks and never raises. Sending happens off the caller's thread, with a
  short timeout; a missing Telegraf drops the batch, counts it (``dropped_batches`` in the
  ``jobstream_metrics`` measurement) and logs once until sending works again.
- Every point carries the process's ``host`` and ``process`` tags; names and values are
  escaped by :mod:`streams.lineproto`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

from streams.lineproto import FieldValue, batches, encode

log = logging.getLogger("jobstream.metrics")
UDP_MAX = 60_000  # bytes per datagram (under the 64 KiB UDP limit, Telegraf's default read)
HTTP_MAX = 1_000_000
RESERVOIR = 5_000  # observations kept per series and interval (a uniform sample beyond)
Key = tuple[str, tuple[tuple[str, str], ...]]


def _key(name: str, tags: Mapping[str, str]) -> Key:
    return name, tuple(sorted(tags.items()))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    i = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))  # nearest rank
    return values[i]


class Metrics:
    def __init__(
        self,
        url: str | None,
        *,
        interval_s: float = 5.0,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url or None
        self.interval_s = interval_s
        self.tags = dict(tags or {})
        self._lock = threading.Lock()
        self._counts: dict[Key, dict[str, float]] = {}
        self._obs: dict[Key, list[float]] = {}
        self._obs_seen: dict[Key, int] = {}
        self._gauges: dict[Key, dict[str, FieldValue]] = {}
        self.sent_batches = 0
        self.dropped_batches = 0
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._addr: tuple[str, int] | None = None
        if self.url:
            parsed = urllib.parse.urlsplit(self.url)
            if parsed.scheme == "udp":
                self._addr = (parsed.hostname or "127.0.0.1", parsed.port or 8094)
                self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            elif parsed.scheme not in ("http", "https"):
                raise ValueError(f"metrics_url must be udp://, http:// or https://: {self.url}")

    @property
    def enabled(self) -> bool:
        return self.url is not None

    # -- recording (any thread, never blocks) ---------------------------------------------

    def count(self, name: str, tags: Mapping[str, str] | None = None, **fields: float) -> None:
        """Add to counters (fields default to ``n=1``)."""
        if not self.enabled:
            return
        k = _key(name, tags or {})
        with self._lock:
            cur = self._counts.setdefault(k, {})
            for f, v in (fields or {"n": 1}).items():
                cur[f] = cur.get(f, 0) + v

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        """One observation of a distribution (a latency in ms, a size)."""
        if not self.enabled:
            return
        k = _key(name, tags or {})
        with self._lock:
            seen = self._obs_seen.get(k, 0) + 1
            self._obs_seen[k] = seen
            values = self._obs.setdefault(k, [])
            if len(values) < RESERVOIR:
                values.append(value)
            else:  # reservoir sampling keeps the percentiles honest under load
                j = hash((seen, value)) % seen
                if j < RESERVOIR:
                    values[j] = value

    def gauge(self, name: str, tags: Mapping[str, str] | None = None, **fields: FieldValue) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._gauges[_key(name, tags or {})] = dict(fields)

    # -- flushing -------------------------------------------------------------------------

    def lines(self, now_ns: int | None = None) -> list[str]:
        """Take what was recorded as line protocol (counters stay, as totals)."""
        ts = now_ns if now_ns is not None else time.time_ns()
        with self._lock:
            counts = {k: dict(v) for k, v in self._counts.items()}
            obs, seen = self._obs, self._obs_seen
            self._obs, self._obs_seen = {}, {}
            gauges, self._gauges = self._gauges, {}
        out: list[str] = []

        def add(k: Key, fields: Mapping[str, FieldValue]) -> None:
            line = encode(k[0], {**self.tags, **dict(k[1])}, fields, ts)
            if line is not None:
                out.append(line)

        for k, c in counts.items():
            add(k, {f: (int(v) if float(v).is_integer() else v) for f, v in c.items()})
        for k, values in obs.items():
            values.sort()
            add(
                k,
                {
                    "count": seen[k],
                    "sum": float(sum(values)) * seen[k] / len(values),
                    "min": float(values[0]),
                    "max": float(values[-1]),
                    "p50": float(_pct(values, 0.50)),
                    "p95": float(_pct(values, 0.95)),
                    "p99": float(_pct(values, 0.99)),
                },
            )
        for k, g in gauges.items():
            add(k, g)
        add(
            ("jobstream_metrics", ()),
            {"sent_batches": self.sent_batches, "dropped_batches": self.dropped_batches},
        )
        return out

    def flush(self) -> bool:
        """Send what was recorded; False when a batch was dropped."""
        if not self.enabled:
            return True
        ok = True
        limit = UDP_MAX if self._sock is not None else HTTP_MAX
        for payload in batches(self.lines(), limit):
            try:
                self._send(payload)
                self.sent_batches += 1
            except (OSError, urllib.error.URLError, ValueError) as exc:
                ok = False
                self.dropped_batches += 1
                if not self._failing:
                    log.warning(
                        "metrics: cannot send to %s (%s); dropping until it works", self.url, exc
                    )
                self._failing = True
        if ok and self._failing:
            log.warning("metrics: sending to %s works again", self.url)
            self._failing = False
        return ok

    def _send(self, payload: bytes) -> None:
        if self._sock is not None and self._addr is not None:
            self._sock.sendto(payload, self._addr)
            return
        assert self.url is not None
        req = urllib.request.Request(self.url, data=payload, method="POST")
        with urllib.request.urlopen(req, timeout=2.0) as resp:
            if resp.status >= 300:
                raise ValueError(f"HTTP {resp.status}")

    def start(self) -> Metrics:
        """Flush every ``interval_s`` on a daemon thread (idempotent)."""
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception:  # a metrics bug must never take a process down
                log.exception("metrics flush failed")

    def close(self) -> None:
        """Stop the thread and send what is left (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            self.flush()
        except Exception:
            log.exception("metrics flush failed")
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def process_tags(process: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``host``, ``process`` (scheduler, worker …) and ``instance`` (host-pid: counters are
    totals per process, so each process needs its own series)."""
    host = socket.gethostname()
    return {"host": host, "process": process, "instance": f"{host}-{os.getpid()}", **(extra or {})}


NULL = Metrics(None)
