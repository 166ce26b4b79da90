"""PostgreSQL connections for the store: the pool, transactions in their three shapes
(plain, pipelined, autocommit), reads, and the migrations.

Invariants:
- Every state change is a guarded ``UPDATE … WHERE state = ANY(allowed) [AND attempt = n]``
  mirroring ``agents.core.lifecycle``; replaying an event changes nothing.
- One transaction per batch of events, never one per event; many rows per statement.
- Parameterized SQL only; identifiers never come from input.
- psycopg errors are translated to :class:`StoreUnavailable` at this boundary for connection
  failures; constraint violations are bugs and propagate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from agents.errors import StoreUnavailable

MIGRATION_LOCK = 7_301_947_113


def migrations() -> list[tuple[int, str, str]]:
    files = sorted((Path(__file__).resolve().parent / "migrations").glob("*.sql"))
    return [(int(p.name.split("_", 1)[0]), p.name, p.read_text()) for p in files]


# the tables the agents' transactions touch
HOT_TABLES = (
    "jobs",
    "job_deps",
    "job_history",
    "job_holds",
    "semaphores",
    "rate_log",
    "workers",
    "pauses",
    "rate_limits",
    "dead_letters",
)


async def warm_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """Ready a long-running agent's connection for its hot statements.

    - Every statement is prepared on first use and planned once per connection
      (``prepare_threshold`` 0, ``plan_cache_mode = force_generic_plan``): by default psycopg
      prepares a statement on its sixth run and the server re-plans a prepared one for its
      first five runs, so each statement cost a planning per run at first, 0.45–1.9 ms for the
      working-set query (measured), on every connection.
    - A statement is planned against every hot table: a server process loads a table's and its
      indexes' catalog entries the first time one plans against them. Measured: a
      lifecycle-shaped transaction took 4–6 ms as a cold connection's first (27 ms as the
      first in its database), 3–4 ms after this, 2–2.5 ms from the second on.
    Best effort for the tables: before the migrations ran, there is nothing to warm."""
    conn.prepare_threshold = 0
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.commit()
    try:
        for table in HOT_TABLES:
            await conn.execute(sql.SQL("SELECT 1 FROM {} LIMIT 0").format(sql.Identifier(table)))
    except psycopg.errors.UndefinedTable:
        pass
    finally:
        await conn.rollback()


class Connections:
    """The pool and the shapes of transaction every part of the store uses."""

    def __init__(
        self, dsn: str, *, min_size: int = 1, max_size: int = 4, warm: bool = False
    ) -> None:
        """``warm``: connections are readied for the hot statements when they open
        (:func:`warm_connection`; long-running agents, so their first batches do not pay)."""
        self.dsn = dsn
        self._pool = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={"autocommit": False},
            configure=warm_connection if warm else None,
        )

    async def open(self, timeout_s: float = 30.0) -> None:
        try:
            await self._pool.open(wait=True, timeout=timeout_s)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from None
        except Exception as exc:  # psycopg_pool.PoolTimeout
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL within {timeout_s:.0f} s: {exc}"
            ) from None

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def pipelined(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection in pipeline mode, for a caller that opens its transaction
        itself and reads results after COMMIT went out with its last statements (one round
        trip fewer than reading first)."""
        try:
            async with self._pool.connection() as conn, conn.pipeline():
                yield conn
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL: {exc}") from None

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection whose statements commit each on its own: a lone statement goes
        without BEGIN and COMMIT (one command for the server, not three)."""
        try:
            async with self._pool.connection() as conn:
                await conn.set_autocommit(True)
                try:
                    yield conn
                finally:
                    await conn.set_autocommit(False)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL: {exc}") from None

    @asynccontextmanager
    async def tx(self, *, pipeline: bool = False) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """One transaction on a pooled connection. ``pipeline``: in pipeline mode, so BEGIN
        travels with the first statement and COMMIT with the last writes (a transaction of
        one query is one round trip, not three); for the hot paths, whose statements are
        single queries (no COPY, no multi-statement scripts)."""
        try:
            async with self._pool.connection() as conn:
                if pipeline:
                    async with conn.pipeline(), conn.transaction():
                        yield conn
                else:
                    async with conn.transaction():
                        yield conn
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL: {exc}") from None

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection for reads; what it read is rolled back when it goes back."""
        try:
            async with self._pool.connection() as conn:
                try:
                    yield conn
                finally:
                    await conn.rollback()
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL: {exc}") from None

    @asynccontextmanager
    async def notifications(self, channel: str) -> AsyncIterator[AsyncIterator[str]]:
        """The payloads of ``NOTIFY channel`` from any process, on a connection of its own
        (LISTEN holds it); a lost connection ends as :class:`StoreUnavailable`."""
        try:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                yield (n.payload async for n in conn.notifies())
        except psycopg.Error as exc:
            raise StoreUnavailable(f"PostgreSQL: {exc}") from None

    # -- schema -------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        """Apply pending migrations under an advisory lock; return the names applied."""
        applied: list[str] = []
        async with self.tx() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT version FROM schema_migrations")
            done = {r[0] for r in await cur.fetchall()}
            for version, name, sql in migrations():
                if version in done:
                    continue
                await conn.execute(sql.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
                )
                applied.append(name)
        return applied
