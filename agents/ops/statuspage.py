"""The live status page, served by the scheduler (aiohttp, read-only).

    JOBSTREAM_STATUS_BIND=127.0.0.1:8088   where (default; "" turns it off)
    JOBSTREAM_STATUS_TOKEN=...             required when the address is not loopback

Routes: ``/`` the page (``agents/ops/web/status.html``: queues per tenant and kind, throughput
and latency charts, workers with heartbeats, recent failures and dead letters; ``/?job=ID``
adds the job's DAG), ``/api/status``, ``/api/job/{id}``, ``/healthz``.

Invariants:
- Read-only: no route changes state. With a token configured, every route but ``/healthz``
  needs ``Authorization: Bearer <token>`` or ``?token=`` (compared in constant time).
- A sampler keeps the last 10 minutes of throughput, latency and queue totals in memory
  (every 2 s, from indexed queries), so the charts need no metrics stack.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from agents.context import Context

log = logging.getLogger("jobstream.status")
PAGE = Path(__file__).resolve().parent / "web" / "status.html"
SAMPLE_S = 2.0
KEEP = 300


def _json(data: Any) -> web.Response:
    def default(o: Any) -> Any:
        if isinstance(o, datetime):
            return o.isoformat()
        if isinstance(o, bytes):
            return o.decode("utf-8", "replace")
        return str(o)

    return web.Response(text=json.dumps(data, default=default), content_type="application/json")


class StatusPage:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=KEEP)
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/", self.page)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/api/job/{id}", self.api_job)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        token = self.ctx.settings.status_token
        if token and request.path != "/healthz":
            given = request.query.get("token", "")
            header = request.headers.get("Authorization", "")
            if header.startswith("Bearer "):
                given = header[7:]
            if not hmac.compare_digest(given.encode(), token.encode()):
                return web.Response(status=401, text="a token is required (?token= or Bearer)")
        response: web.StreamResponse = await handler(request)
        return response

    async def page(self, _request: web.Request) -> web.Response:
        return web.Response(text=PAGE.read_text(), content_type="text/html")

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def api_status(self, _request: web.Request) -> web.Response:
        store = await self.ctx.store()
        data = await store.status(window_s=60.0)
        data["failures"] = await store.recent_failures(15)
        data["dead_letters"] = await store.dead_letters(15)
        data["series"] = list(self.samples)
        data["now"] = time.time()
        return _json(data)

    async def api_job(self, request: web.Request) -> web.Response:
        store = await self.ctx.store()
        job = await store.job(request.match_info["id"])
        if job is None:
            return web.Response(status=404, text="no such job")
        group = job.get("workflow_id") or job.get("group_key") or job["id"]
        job["dag"] = await store.workflow(group) if group else []
        return _json(job)

    async def sample(self) -> None:
        store = await self.ctx.store()
        ok, bad, p50, p99, ready, running = await store.recent_sample(SAMPLE_S * 5)
        window = SAMPLE_S * 5
        self.samples.append(
            {
                "t": time.time(),
                "succeeded_per_s": round(ok / window, 2),
                "failed_per_s": round(bad / window, 2),
                "start_p50_ms": None if p50 is None else round(float(p50), 1),
                "start_p99_ms": None if p99 is None else round(float(p99), 1),
                "ready": ready,
                "running": running,
            }
        )

    async def run(self) -> None:
        """Serve until cancelled (the scheduler's lifetime)."""
        bind = self.ctx.settings.status_bind
        if not bind:
            return
        host, _, port = bind.rpartition(":")
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host or "127.0.0.1", int(port))
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)
        self.ctx.status_url = f"http://{host or '127.0.0.1'}:{self.port}/"
        log.info("status page on %s", self.ctx.status_url)
        try:
            while True:
                try:
                    await self.sample()
                except Exception as exc:  # a sampling hiccup must not end the page
                    log.warning("status sample failed: %s", exc)
                await asyncio.sleep(SAMPLE_S)
        finally:
            await self.runner.cleanup()
