"""Run one Python job: ``python -m agents.pycall module:function`` with the job's args as a
JSON object on stdin, called as keyword arguments. The worker starts this in a child
interpreter per attempt, so the job cannot block or crash the worker loop.

Exit codes: 0 the function returned (its return value, if not None, is printed as JSON);
1 it raised (the traceback goes to the job's log); 2 the entry point or args are unusable.
A job reports progress with :func:`report_progress`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from typing import Any


def report_progress(fraction: float) -> None:
    """Tell the worker how far the job is (0..1); shown by ``jobstream job`` and ``workers``."""
    path = os.environ.get("JOBSTREAM_PROGRESS_FILE")
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{max(0.0, min(1.0, float(fraction))):.4f}")
        os.replace(tmp, path)


def resolve(entrypoint: str) -> Any:
    module_name, _, attr = entrypoint.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{entrypoint} is not callable")
    return obj


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m agents.pycall module:function < args.json", file=sys.stderr)
        return 2
    try:
        fn = resolve(argv[0])
        args = json.loads(sys.stdin.read() or "{}")
        if not isinstance(args, dict):
            raise TypeError("the job's args must be a JSON object")
    except Exception as exc:
        print(f"cannot call {argv[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    try:
        result = fn(**args)
    except Exception:
        traceback.print_exc()
        return 1
    if result is not None:
        print(json.dumps(result, default=str, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
