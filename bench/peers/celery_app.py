"""The Celery peer: Redis as broker and result backend, defaults otherwise (prefork pool,
prefetch multiplier 4, results stored): what a Celery user gets out of the box.

Environment: ``BENCH_REDIS`` (default redis://127.0.0.1:16379), ``BENCH_TIMINGS`` (timing
folder), ``BENCH_TENANTS`` and ``BENCH_RATE`` (the ``ratelimit`` scenario: one task per
tenant, ``limited.tN``, with ``rate_limit=BENCH_RATE``; Celery limits per task type and per
worker, not per tenant, so a task per tenant is the nearest it comes).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from bench.peers import record

REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:16379")
app = Celery("jsbench", broker=f"{REDIS}/0", backend=f"{REDIS}/1")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=None,
)


@app.task(name="noop")
def noop(k: str, s: float, t: str = "") -> None:
    a = time.time()
    record(k=k, t=t, s=s, a=a, f=time.time())


@app.task(name="work")
def work(k: str, s: float, seconds: float, t: str = "", u: str = "") -> None:
    a = time.time()
    time.sleep(seconds)
    record(k=k, t=t, u=u, s=s, a=a, f=time.time())


def _latest(prev: Any) -> float | None:
    """The latest finish among the dependencies' results (a chain passes one, a chord a list)."""
    if prev is None:
        return None
    if isinstance(prev, list):
        return max(p["f"] for p in prev)
    return float(prev["f"])


@app.task(name="step")
def step(prev: Any, k: str, u: str, s: float) -> dict[str, float]:
    a = time.time()
    f = time.time()
    record(k=k, u=u, s=s, a=a, f=f, d=_latest(prev))
    return {"f": f}


def _limited(t: str) -> Any:
    def limited(k: str, s: float) -> None:
        a = time.time()
        record(k=k, t=t, s=s, a=a, f=time.time())

    return app.task(name=f"limited.{t}", rate_limit=os.environ.get("BENCH_RATE"))(limited)


LIMITED = {
    f"t{i}": _limited(f"t{i}") for i in range(int(os.environ.get("BENCH_TENANTS", "0") or 0))
}
