"""Opt-in per-job stage timestamps for latency work.

With ``trace_file`` set (``JOBSTREAM_TRACE_FILE``), every process appends one line per job and
stage to that file: ``<stage> <job> <unix time> <pid>`` (``-`` for a stage without a job, e.g.
an admission round). Off by default: one attribute test per call. ``python -m bench unlock
--trace`` turns it on for its processes and reports the unlock path stage by stage
(``bench.trace``). Lines are written whole (one ``write`` each, append mode), so processes
sharing the file do not interleave within a line.
"""

from __future__ import annotations

import os
import time
from typing import IO


class Tracer:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self.on = path is not None
        self._file: IO[str] | None = None
        self._pid = os.getpid()

    def mark(self, stage: str, *jobs: str, at: float | None = None) -> None:
        """Record that ``jobs`` (none: the process as a whole) reached ``stage``."""
        if not self.on:
            return
        if self._file is None:
            assert self.path is not None
            self._file = open(self.path, "a", buffering=1)
        t = time.time() if at is None else at
        self._file.write(
            "".join(f"{stage} {job} {t:.6f} {self._pid}\n" for job in (jobs or ("-",)))
        )
