"""Python jobs the benchmarks run (kind ``pynoop``: entrypoint ``bench.jobs:noop``).

Where ``BENCH_TIMINGS`` is set (the side-by-side scenarios, ``bench/systems.py``), a job
appends one line to it when its function returns, as every peer's task does
(``bench.peers.record``): the scenarios count finished jobs the same way for every system,
without a query loading PostgreSQL while jobstream works.
"""

import os
import time

from bench.peers import record

_RECORD = bool(os.environ.get("BENCH_TIMINGS"))


def noop() -> None:
    """Does nothing: what is measured is everything around it."""
    if _RECORD:
        record(f=time.time())


def work(seconds: float = 0.0) -> None:
    """Busy for ``seconds`` (a sleep: the slot is taken, the CPU is not)."""
    time.sleep(seconds)
    if _RECORD:
        record(f=time.time())
