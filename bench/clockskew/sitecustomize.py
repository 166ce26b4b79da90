"""A Python process whose wall clock is off by ``JOBSTREAM_BENCH_CLOCK_SKEW_S`` seconds (a clock
stepped by NTP, a host without it): ``time.time`` and ``time.time_ns`` shifted, monotonic
time untouched. Imported at start-up when this folder is on ``PYTHONPATH`` (see
:func:`bench.clockskew.skewed_env`); used by the chaos run's ``clock_step`` fault and the
liveness test. libfaketime does this for a whole process, but it also shifts the deadlines of
librdkafka's timed waits (a consumer group join took 30 s with +30 s), which no clock step
does; what jobstream takes from the wall clock is what this shifts."""

from __future__ import annotations

import os
import time

_SKEW_S = float(os.environ.get("JOBSTREAM_BENCH_CLOCK_SKEW_S") or 0.0)
if _SKEW_S:
    _time, _time_ns = time.time, time.time_ns
    _skew_ns = int(_SKEW_S * 1e9)
    time.time = lambda: _time() + _SKEW_S
    time.time_ns = lambda: _time_ns() + _skew_ns
