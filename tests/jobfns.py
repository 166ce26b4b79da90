"""Python job functions the worker tests run through kinds with an ``entrypoint``."""

from __future__ import annotations

import json
import time

from agents.pycall import report_progress


def record(out: str, value: object, steps: int = 3) -> dict[str, object]:
    """Write ``value`` to ``out`` after reporting progress in ``steps`` steps."""
    for i in range(1, steps + 1):
        report_progress(i / steps)
        time.sleep(0.05)
    with open(out, "w") as f:
        json.dump({"value": value}, f)
    return {"written": out}


def explode(message: str) -> None:
    raise RuntimeError(message)


def noop() -> None:
    """The no-op Python job (benchmarks)."""


def hang(seconds: float) -> None:
    time.sleep(seconds)


def die(code: int) -> None:
    import os

    os._exit(code)
