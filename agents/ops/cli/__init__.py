"""The ``jobstream`` command line.

Exit codes: 0 success; 1 the operation failed (a job failed, topics disagree …);
2 bad usage or configuration; 3 a service (Kafka, PostgreSQL) is unreachable.
Every command that prints data takes ``--json``.
"""

from __future__ import annotations

import logging
import sys

from agents.errors import ConfigError, JobstreamError, StoreUnavailable

# isort: off
# the commands register in this order, the order of ``jobstream --help``
from agents.ops.cli import setup, submit, inspect, control, run

# isort: on
from agents.ops.cli.common import app, err
from agents.ops.cli.submit import load_workflow
from streams.errors import KafkaUnavailable, StreamsError

__all__ = ["app", "control", "inspect", "load_workflow", "main", "run", "setup", "submit"]


def main() -> None:
    # a connection the pool retries is reported once, as the command's error, not per try
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    try:
        app()
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        sys.exit(2)
    except (KafkaUnavailable, StoreUnavailable) as exc:
        err.print(f"[red]service unavailable:[/] {exc}")
        sys.exit(3)
    except (JobstreamError, StreamsError) as exc:
        err.print(f"[red]error:[/] {exc}")
        sys.exit(1)
