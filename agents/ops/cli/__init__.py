"""The ``jobstream`` command line.

Exit codes: 0 success; 1 the operation failed (a job failed, topics disagree …);
2 bad usage or configuration; 3 a service (Kafka, PostgreSQL) is unreachable.
Every command that prints data takes ``--json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

from agents.errors import ConfigError, JobstreamError, StoreUnavailable

# isort: off
# the commands register in this order, the order of ``jobstream --help``
from agents.ops.cli import setup, submit, inspect, control, schedule, run

# isort: on
from agents.ops.cli.common import app, err
from agents.ops.cli.submit import load_workflow
from streams.errors import KafkaUnavailable, StreamsError

__all__ = [
    "app",
    "control",
    "inspect",
    "load_workflow",
    "main",
    "run",
    "schedule",
    "setup",
    "submit",
]


# commands that run until stopped: they end the ordinary way (their children and threads
# are the interpreter's to wind up)
RUNS_UNTIL_STOPPED = frozenset({"scheduler", "worker", "demo"})


def main() -> None:
    """The ``jobstream`` command. A command that ends on its own leaves without the
    interpreter's teardown (freeing every object, unloading librdkafka, libpq and their TLS
    libraries): ~40 ms of a 0.3 s command, once its output is flushed."""
    try:
        _main()
    except SystemExit as exc:
        if sys.argv[1:2] and sys.argv[1] in RUNS_UNTIL_STOPPED:
            raise
        _leave(exc.code)
    if not (sys.argv[1:2] and sys.argv[1] in RUNS_UNTIL_STOPPED):
        _leave(0)


def _leave(code: object) -> None:
    """Exit with ``code`` (``sys.exit``'s meaning) right after flushing output and logs."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")
        status = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _main() -> None:
    # faust's mode asks platformdirs for a runtime directory it never uses in jobstream
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    # a connection the pool retries is reported once, as the command's error, not per try
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    try:
        app()
    except ConfigError as exc:
        _fail("configuration error", exc, 2)
    except (KafkaUnavailable, StoreUnavailable) as exc:
        _fail("service unavailable", exc, 3)
    except (JobstreamError, StreamsError) as exc:
        _fail("error", exc, 1)


def _fail(what: str, exc: Exception, code: int) -> None:
    """Say why the command failed and exit ``code``: for people on stderr, under ``--json``
    as ``{"error": …, "code": …}`` on stdout for scripts."""
    if "--json" in sys.argv[1:]:
        sys.stdout.write(json.dumps({"error": f"{what}: {exc}", "code": code}) + "\n")
    else:
        err.print(f"[red]{what}:[/] {exc}")
    sys.exit(code)
