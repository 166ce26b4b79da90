"""The procrastinate peer: PostgreSQL only, LISTEN/NOTIFY on, async tasks (its recommended
shape when a worker runs several jobs at once).

It has no dependencies between jobs: the nearest equivalent, which its documentation points
to, is a task deferring its successors when it ends. Fan-in (the report after six scanners)
takes a counter row per upload: the scanner that brings it to zero defers the report.
It has no rate limits either (the ``ratelimit`` scenario leaves it out and says so).

Environment: ``BENCH_PROCRASTINATE_DSN`` (the database), ``BENCH_TIMINGS``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from procrastinate import App, PsycopgConnector

from bench.peers import record
from bench.workflow import SCANNERS

app = App(connector=PsycopgConnector(conninfo=os.environ.get("BENCH_PROCRASTINATE_DSN", "")))

FANIN_DDL = (
    "CREATE TABLE IF NOT EXISTS bench_fanin "
    "(u text PRIMARY KEY, remaining int NOT NULL, dmax double precision NOT NULL DEFAULT 0)"
)


@app.task(name="noop")
async def noop(k: str, s: float, t: str = "") -> None:
    a = time.time()
    record(k=k, t=t, s=s, a=a, f=time.time())


@app.task(name="work")
async def work(k: str, s: float, seconds: float, t: str = "", u: str = "") -> None:
    import asyncio

    a = time.time()
    await asyncio.sleep(seconds)
    record(k=k, t=t, u=u, s=s, a=a, f=time.time())


@app.task(name="step")
async def step(k: str, u: str, s: float, d: float | None = None) -> None:
    a = time.time()
    f = time.time()
    record(k=k, u=u, s=s, a=a, f=f, d=d)
    name = k.rsplit("-", 1)[1]
    nxt: list[dict[str, Any]] = []
    if name == "unpack":
        nxt = [{"k": f"{u}-adj2nest", "u": u, "s": s, "d": f}]
    elif name == "adj2nest":
        await app.connector.execute_query_async(
            "INSERT INTO bench_fanin (u, remaining) VALUES (%(u)s, %(n)s)", u=u, n=len(SCANNERS)
        )
        nxt = [{"k": f"{u}-{sc}", "u": u, "s": s, "d": f} for sc in SCANNERS]
    elif name in SCANNERS:
        row = await app.connector.execute_query_one_async(
            "UPDATE bench_fanin SET remaining = remaining - 1, dmax = greatest(dmax, %(f)s) "
            "WHERE u = %(u)s RETURNING remaining, dmax",
            u=u,
            f=f,
        )
        if row["remaining"] == 0:
            nxt = [{"k": f"{u}-report", "u": u, "s": s, "d": row["dmax"]}]
    if nxt:
        await step.batch_defer_async(*nxt)
