"""Processes with a skewed wall clock (``sitecustomize`` in this folder)."""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def skewed_env(skew_s: float, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables that start a Python process whose wall clock is ``skew_s``
    seconds off (``base``: the environment it extends, default this process's)."""
    path = (base or os.environ).get("PYTHONPATH", "")
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), path) if p),
        "JOBSTREAM_BENCH_CLOCK_SKEW_S": str(skew_s),
    }
