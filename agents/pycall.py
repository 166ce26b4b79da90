"""Python jobs in child interpreters.

``python -m agents.pycall module:function``: run one job, args as a JSON object on stdin,
called as keyword arguments. Exit codes: 0 the function returned (its return value, if not
None, is printed as JSON); 1 it raised (the traceback goes to the job's log); 2 the entry
point or args are unusable.

``python -m agents.pycall --serve``: a warm pool member (``agents.worker.pypool``). It reads one
request per line on stdin (entry point, args, log file, environment, working directory),
runs it with fds 1 and 2 pointed at the job's log file, and answers one line on its private
copy of the original stdout: the exit code (``0``, ``1`` or ``2``) and a newline. Imports
stay loaded between jobs, so a job costs a pipe round trip instead of an interpreter start.
The worker kills a member whose job times out or is cancelled and starts a fresh one.

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


def call(entrypoint: str, args: Any) -> int:
    try:
        fn = resolve(entrypoint)
        if not isinstance(args, dict):
            raise TypeError("the job's args must be a JSON object")
    except Exception as exc:
        print(f"cannot call {entrypoint}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    try:
        result = fn(**args)
    except Exception:
        traceback.print_exc()
        return 1
    if result is not None:
        print(json.dumps(result, default=str, ensure_ascii=False))
    return 0


def serve() -> int:
    """The pool member's loop (see the module docstring). Each job sees the member's own
    environment plus its request's variables: only the variables that differ from the last
    job's are set (a full reset costs ~100 µs a job), and a job that changed the
    environment itself has it reset before the next one."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    requests = os.fdopen(os.dup(0), "r")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # a job that reads stdin reads nothing, not the next request
    os.close(devnull)
    base_env = dict(os.environ)
    base_cwd = os.getcwd()
    applied: dict[str, str] = {}  # the last job's own variables
    for line in requests:
        req = json.loads(line)
        try:
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except FileNotFoundError:  # the log directory went away since first use
            os.makedirs(os.path.dirname(req["log"]), exist_ok=True)
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        env: dict[str, str] = req["env"]
        _apply_env(base_env, applied, env)
        applied = env
        try:
            os.chdir(req["cwd"] or base_cwd)
            rc = call(req["entrypoint"], req["args"])
        except BaseException:  # SystemExit from a job, and the like: report, keep serving
            traceback.print_exc()
            rc = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        os.chdir(base_cwd)
        if len(os.environ) != len(base_env.keys() | env.keys()) or dict(os.environ) != {
            **base_env,
            **env,
        }:  # the job changed its environment: the next one starts from the member's own
            os.environ.clear()
            os.environ.update(base_env)
            applied = {}
        reply.write(f"{rc}\n")
    return 0


def _apply_env(base: dict[str, str], last: dict[str, str], env: dict[str, str]) -> None:
    """Turn the environment of a job that ran with ``last`` into one with ``env``."""
    for name in last.keys() - env.keys():
        if name in base:
            os.environ[name] = base[name]
        else:
            del os.environ[name]
    for name, value in env.items():
        if last.get(name) != value or name not in os.environ:
            os.environ[name] = value


def main(argv: list[str]) -> int:
    if argv == ["--serve"]:
        return serve()
    if len(argv) != 1:
        print("usage: python -m agents.pycall module:function < args.json", file=sys.stderr)
        return 2
    try:
        args = json.loads(sys.stdin.read() or "{}")
    except ValueError as exc:
        print(f"cannot read the job's args: {exc}", file=sys.stderr)
        return 2
    return call(argv[0], args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
