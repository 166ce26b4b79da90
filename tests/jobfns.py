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


def count(out: str, n: int, every_s: float = 0.05) -> None:
    """Append ``1..n`` to ``out``, one line every ``every_s`` (pause tests watch it stop)."""
    for i in range(1, n + 1):
        with open(out, "a") as f:
            f.write(f"{i}\n")
        time.sleep(every_s)


def setenv(name: str, value: str) -> None:
    import os

    os.environ[name] = value


def getenv(out: str, names: list[str]) -> None:
    """Write the values of ``names`` in this job's environment to ``out`` (JSON)."""
    import os

    with open(out, "w") as f:
        json.dump({n: os.environ.get(n) for n in names}, f)
