"""The Python jobs ``jobstream demo`` runs (entrypoint kinds, in the worker's warm pool)."""

from __future__ import annotations

import time


def noop() -> None:
    """Does nothing: what the demo's burst measures is everything around it."""


def work(seconds: str | float = 0.05) -> None:
    """Takes its slot for ``seconds`` (a sleep)."""
    time.sleep(float(seconds))


def unpack(upload: str, broken: str = "no") -> None:
    """FOSSology's first step; an upload marked broken fails it (its dependents then fail
    with it as the root cause)."""
    if broken == "yes":
        raise RuntimeError(f"upload {upload}: not a readable archive")
    time.sleep(0.02)


def scan(upload: str, agent: str = "nomos") -> None:
    """A licence or copyright scanner over an unpacked upload."""
    time.sleep(0.02)


DEMO_KINDS = {
    "demo-noop": {"entrypoint": "agents.ops.demojobs:noop", "timeout_s": 60, "max_attempts": 1},
    "demo-work": {"entrypoint": "agents.ops.demojobs:work", "timeout_s": 60, "max_attempts": 1},
    "demo-unpack": {
        "entrypoint": "agents.ops.demojobs:unpack",
        "timeout_s": 60,
        "max_attempts": 1,
    },
    "demo-scan": {"entrypoint": "agents.ops.demojobs:scan", "timeout_s": 60, "max_attempts": 1},
}
