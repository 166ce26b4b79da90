"""The faust-streaming application: the scheduler's stream agents wired to their topics.

The hot cycle (``agents.scheduler.cycle``, consumer group ``<app_id>.cycle``): one batched
consumer of the high-rate topics, one cycle per fetch:
- jobs.independent + jobs.dependent + jobs.events (the last two co-partitioned by group) →
  one PostgreSQL transaction (submissions, guarded transitions, dependency decisions) →
  admission. A ready job whose tenant this process owns is handed over in-process; the others
  go through jobs.ready (keyed by tenant) to their owner.
- jobs.ready → the admission owner (``agents.scheduler.admission``), whose rounds dispatch
  (ready → dispatched) to jobs.dispatch.

faust agents (consumer group ``settings.app_id``), for the low-rate topics:
- ``heartbeats``   workers.heartbeat → PostgreSQL (workers table, job progress)
- ``control``      jobs.control → PostgreSQL (pauses, limits, priorities, cancel, retry)
- ``telemetry``    telemetry.hosts (Telegraf) → PostgreSQL host_load → the brake
- the liveness monitor (``agents.scheduler.monitor``): silent workers → lost, their jobs retried
- the ticker (``agents.scheduler.ticker``): periodic schedules' due ticks → jobs.independent
- a reconciliation timer, the safety net: re-settles old waiting jobs (expiry, races) and
  re-forwards jobs left ready or unconfirmed.

Invariants:
- Values are raw bytes (no faust codec, no Python object serialisation); our decoder turns
  bad bytes into dead letters. Offsets are stored or acked by hand (the cycle; faust agents
  through ``take_available``): an offset is committed only after its batch is durable in
  PostgreSQL and its follow-up events are confirmed by the broker.
- An unexpected error in a batch never stops the stream: the batch is retried message by
  message, and a message that still fails is dead-lettered with the error as the reason.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import faust

from agents.context import Context, RawMessage, retrying
from agents.heap import freeze_once_assigned, freeze_startup_heap
from agents.kafkaauth import faust_credentials
from agents.ops.statuspage import StatusPage
from agents.scheduler.admission import Admission
from agents.scheduler.batching import take_available
from agents.scheduler.control import handle_control
from agents.scheduler.cycle import HotCycle, handle_safely
from agents.scheduler.dependencies import settle_cycle
from agents.scheduler.dispatching import resend_unconfirmed
from agents.scheduler.heartbeats import handle_heartbeats
from agents.scheduler.intake import forward_ready
from agents.scheduler.monitor import Monitor
from agents.scheduler.telemetry import handle_telemetry
from agents.scheduler.ticker import Ticker

log = logging.getLogger("jobstream.app")
STOP_WAIT_S = 10.0
SEND_PRUNE_ROUNDS = 10  # a send left unconfirmed is forgotten after this many reconcile bounds
Handler = Callable[[Context, Sequence[RawMessage]], Awaitable[int]]


def _raw(event: Any) -> RawMessage:
    m = event.message
    return RawMessage(m.topic, m.partition, m.offset, m.key, m.value)


def faust_app(app_id: str, bootstrap: str, **conf: Any) -> faust.App:
    """A faust app as the scheduler runs it: raw bytes in and out, topics made by
    ``jobstream topics apply`` (never declared), no web server, in-memory tables; ``conf``
    adds to or overrides that (the scheduler's commit cadence and credentials)."""
    brokers = [f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip()]
    # faust makes a data directory even for in-memory tables (mkdir without parents): keep
    # it out of the working directory
    datadir = Path(tempfile.gettempdir()) / "jobstream-faust"
    datadir.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "broker": brokers,
        "value_serializer": "raw",
        "key_serializer": "raw",
        "web_enabled": False,
        "topic_allow_declare": False,
        "topic_disable_leader": True,
        "consumer_auto_offset_reset": "earliest",
        "store": "memory://",
        "datadir": str(datadir / "{conf.name}-data"),
    }
    return faust.App(app_id, **{**settings, **conf})


def build_app(ctx: Context) -> faust.App:
    s = ctx.settings
    # mode warns when a timer's run took longer than its interval (e.g. faust's 0.5 s commit
    # timer on a busy machine): noise for an operator; the scheduler's own metrics show load
    logging.getLogger("mode.timers").setLevel(logging.ERROR)
    app = faust_app(
        s.app_id,
        s.require_kafka(),
        broker_commit_every=s.batch_size,
        broker_commit_interval=0.5,
        broker_session_timeout=s.scheduler_session_timeout_s,
        broker_heartbeat_interval=max(1.0, s.scheduler_session_timeout_s / 4),
        producer_linger=0.001,
        broker_credentials=faust_credentials(s.kafka_config),
    )

    def topic(*logical: str) -> Any:
        return app.topic(
            *(ctx.topic(t) for t in logical),
            value_type=bytes,
            key_type=bytes,
            value_serializer="raw",
            key_serializer="raw",
        )

    def batch_agent(channel: Any, name: str, handler: Handler) -> None:
        async def agent(stream: Any) -> None:
            noack = stream.noack()
            async for events in take_available(noack, s.batch_size, linger_s=s.batch_wait_s):
                await handle_safely(ctx, name, handler, [_raw(e) for e in events])
                for e in events:
                    await noack.ack(e)

        agent.__name__ = agent.__qualname__ = name
        app.agent(channel, name=name)(agent)

    cycle: HotCycle | None = None

    def assigned() -> set[int] | None:
        return cycle.ready_partitions() if cycle is not None else None

    admission = Admission(ctx, assigned)
    ctx.admission = admission
    ready_topic = ctx.topic("jobs.ready")

    async def handle_cycle(ctx: Context, messages: Sequence[RawMessage]) -> None:
        ready = [m for m in messages if m.topic == ready_topic]
        if len(ready) < len(messages):
            await settle_cycle(ctx, [m for m in messages if m.topic != ready_topic])
        if ready:
            await admission.handle_ready(ctx, ready)

    cycle = HotCycle(ctx, handle_cycle, on_assignment=admission.wake.set)
    cycle_done = asyncio.Event()

    @app.task  # type: ignore[untyped-decorator]
    async def hot_cycle() -> None:
        try:
            await cycle.run()
        finally:
            cycle_done.set()

    batch_agent(topic("workers.heartbeat"), "heartbeats", handle_heartbeats)
    batch_agent(topic("jobs.control"), "control", handle_control)
    batch_agent(topic("telemetry.hosts"), "telemetry", handle_telemetry)

    @app.task  # type: ignore[untyped-decorator]
    async def admission_rounds() -> None:
        await admission.run()

    monitor = Monitor(ctx)
    page = StatusPage(ctx)
    ticker = Ticker(ctx)

    @app.task  # type: ignore[untyped-decorator]
    async def schedules() -> None:
        await ticker.run()

    @app.task  # type: ignore[untyped-decorator]
    async def status_page() -> None:
        try:
            await page.run()
        except OSError as exc:  # the port is taken: the scheduler runs on without its page
            log.error("status page not started on %s: %s", s.status_bind, exc)

    @app.task  # type: ignore[untyped-decorator]
    async def liveness_monitor() -> None:
        await monitor.run()

    @app.task  # type: ignore[untyped-decorator]
    async def settle_heap() -> None:
        await freeze_once_assigned(assigned)

    @app.timer(s.reconcile_interval_s, name="reconcile")  # type: ignore[untyped-decorator]
    async def reconcile() -> None:
        try:
            await reconcile_once(ctx)
        except Exception:  # the safety net must never take the agents down with it
            log.exception("reconcile failed; next try in %.0f s", s.reconcile_interval_s)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def _close(app: faust.App, **_: Any) -> None:
        cycle.stopping = True  # the cycle in hand ends, its offsets stored and committed
        try:
            await asyncio.wait_for(cycle_done.wait(), STOP_WAIT_S)
        except TimeoutError:
            log.warning("the hot cycle did not stop within %.0f s", STOP_WAIT_S)
        await ctx.close()

    return app


async def reconcile_once(ctx: Context) -> tuple[int, int]:
    """The safety net: settle old waiting jobs (expiry, races), re-send dispatches a crash
    left unconfirmed, recompute live capacity (silent workers drop out), prune the window
    log. Ready jobs need no net: their admission owner re-reads them from PostgreSQL."""
    store = await ctx.store()
    s = ctx.settings
    after = s.reconcile_after_s
    released = await retrying(
        "reconcile waiting",
        lambda: store.settle_waiting(
            after,
            now=time.time(),
            grace_s=s.dependency_grace_s,
            allow_cross_tenant=s.allow_cross_tenant_deps,
        ),
    )
    forwarded = await forward_ready(ctx, released)
    unconfirmed = await retrying("reconcile dispatch", lambda: store.unconfirmed_dispatches(after))
    sent = await resend_unconfirmed(ctx, unconfirmed) if unconfirmed else 0
    await retrying(
        "reconcile capacity",
        lambda: store.refresh_capacity(s.capacity_factor, s.worker_lost_after_s),
    )
    # keep an hour at least: the window log doubles as the audit of admission times
    horizon = max([3600.0, *(x.window_s for x in s.rate_limits)])
    await retrying("prune rate log", lambda: store.prune_rate_log(time.time(), horizon))
    await retrying("prune sends", lambda: store.prune_sends(SEND_PRUNE_ROUNDS * after))
    if forwarded or sent:
        log.warning("reconcile: forwarded %d released jobs, re-sent %d dispatches", forwarded, sent)
    return forwarded, sent


class _Worker(faust.Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.stdout.isatty():  # its end writes a cursor escape code into a log file
            self.spinner = None

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        """mode filters at the handler and leaves the root logger at NOTSET, so every
        disabled ``log.debug`` in aiokafka's fetch loop still built a record (~5 % of the
        scheduler's CPU, py-spy): the level goes on the logger too."""
        super().on_setup_root_logger(logger, level)
        logger.setLevel(level or logging.WARNING)


def run_scheduler(ctx: Context) -> None:
    """Run the agents until SIGTERM/SIGINT (faust's worker handles the signals)."""
    app = build_app(ctx)
    freeze_startup_heap("the app built")
    worker = _Worker(app, loglevel=ctx.settings.log_level, quiet=True)
    worker.execute_from_commandline()
