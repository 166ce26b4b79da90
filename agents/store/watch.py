"""Watching jobs until they end, for a command that waits (``submit --wait``): one plain
connection and one read, nothing else of the store loaded (the command's wall time is mostly
Python importing; the façade and its pool cost ~40 ms more than psycopg itself)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import psycopg

from agents.core.lifecycle import TERMINAL
from agents.errors import StoreUnavailable


class JobWatch:
    """``states(ids)`` on one autocommit connection; a PostgreSQL that does not answer within
    ``timeout_s`` is :class:`StoreUnavailable`."""

    def __init__(self, dsn: str, *, timeout_s: float = 5.0) -> None:
        self._dsn = dsn
        self._timeout_s = timeout_s
        self._conn: psycopg.Connection[Any] | None = None

    def __enter__(self) -> Self:
        try:
            self._conn = psycopg.connect(
                self._dsn, autocommit=True, connect_timeout=max(1, round(self._timeout_s))
            )
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.close()

    @staticmethod
    def ended(states: dict[str, str]) -> int:
        """How many of these jobs are in a final state."""
        return sum(st in TERMINAL for st in states.values())

    def states(self, ids: Sequence[str]) -> dict[str, str]:
        """Each known job's state (a job not yet accepted is absent)."""
        assert self._conn is not None, "use JobWatch as a context manager"
        try:
            cur = self._conn.execute("SELECT id, state FROM jobs WHERE id = ANY(%s)", (list(ids),))
            return {r[0]: r[1] for r in cur.fetchall()}
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL: {exc}") from None
