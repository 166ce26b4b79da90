"""The schedulers users would otherwise pick, run beside jobstream in ``bench/compare.py``.

- ``celery_app``: Celery with a Redis broker and result backend (``scripts/redis.sh``).
- ``procrastinate_app``: procrastinate on PostgreSQL.

Every peer task appends one JSON line per job to ``$BENCH_TIMINGS/<pid>.jsonl`` (one
``write`` on an ``O_APPEND`` descriptor: no locks, no extra round trip to a server), so the
peers' timings are read the same way whatever each stores itself. jobstream's come from its
``jobs`` table, where it records them anyway.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_fd: int | None = None
_pid = 0


def record(**fields: Any) -> None:
    """Append one timing record (``k`` key, ``s`` submitted, ``a`` started, ``f`` finished,
    ``d`` the latest dependency's finish, seconds since the epoch)."""
    global _fd, _pid
    if _fd is None or _pid != os.getpid():  # a forked pool child opens its own file
        folder = Path(os.environ["BENCH_TIMINGS"])
        folder.mkdir(parents=True, exist_ok=True)
        _pid = os.getpid()
        _fd = os.open(folder / f"{_pid}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, (json.dumps(fields, separators=(",", ":")) + "\n").encode())


def read_timings(folder: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted(folder.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line:
                out.append(json.loads(line))
    return out


class TimingCounter:
    """How many records the timing files hold, reading only what was appended since the
    last call (a wait loop polls it every 50 ms over tens of thousands of records)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.read: dict[Path, tuple[int, int]] = {}  # file → (bytes read, newlines seen)

    def count(self) -> int:
        for f in self.folder.glob("*.jsonl"):
            pos, lines = self.read.get(f, (0, 0))
            with f.open("rb") as fh:
                fh.seek(pos)
                chunk = fh.read()
            self.read[f] = (pos + len(chunk), lines + chunk.count(b"\n"))
        return sum(lines for _, lines in self.read.values())
