"""Host telemetry from ``telemetry.hosts`` (Telegraf's Kafka output, JSON) → ``host_load``,
and the brake step that turns it into admission's slot capacity (``agents.core.brake``).

Telegraf's JSON serializer writes one metric per message::

    {"name": "cpu", "tags": {"cpu": "cpu-total", "host": "h1"},
     "fields": {"usage_idle": 3.2, ...}, "timestamp": 1700000000}

(``{"metrics": [...]}`` batches are accepted too.) Used: ``cpu`` (cpu-total ``usage_idle``),
``system`` (``load1``, ``n_cpus``) and ``mem`` (``used_percent``); other metrics are ignored.
A message that is not such JSON is dead-lettered with the reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from agents.context import Context, RawMessage, retrying
from agents.core.brake import HostSample, Thresholds
from agents.deadletter import Rejected, dead_letter


def thresholds(ctx: Context) -> Thresholds:
    s = ctx.settings
    return Thresholds(
        cpu_busy_pct=s.brake_cpu_busy_pct,
        load_per_cpu=s.brake_load_per_cpu,
        mem_used_pct=s.brake_mem_used_pct,
        decrease=s.brake_decrease,
        step=s.brake_step,
        stale_after_s=s.brake_stale_after_s,
    )


def parse(value: bytes | None, now: float) -> list[HostSample]:
    """Samples in one message (partial: the fields that metric carries); raises ValueError."""
    try:
        doc = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    metrics = doc.get("metrics") if isinstance(doc, dict) and "metrics" in doc else [doc]
    if not isinstance(metrics, list):
        raise ValueError('expected a Telegraf JSON metric or {"metrics": [...]}')
    out = []
    for m in metrics:
        if not isinstance(m, dict) or not isinstance(m.get("fields"), dict):
            raise ValueError("a metric needs name, tags and fields")
        tags: dict[str, Any] = m.get("tags") or {}
        fields: dict[str, Any] = m["fields"]
        host = str(tags.get("host") or "")[:200]
        if not host:
            raise ValueError("a metric without a host tag")
        ts = m.get("timestamp")
        at = float(ts) if isinstance(ts, int | float) and ts > 0 else now
        if at > 1e12:  # ms/us/ns timestamps
            at /= 10 ** (3 * ((len(str(int(at))) - 10) // 3))
        name = m.get("name")
        if name == "cpu" and tags.get("cpu", "cpu-total") == "cpu-total":
            idle = fields.get("usage_idle")
            if isinstance(idle, int | float):
                out.append(HostSample(host, at, cpu_busy_pct=100.0 - float(idle)))
        elif name == "system":
            load, cpus = fields.get("load1"), fields.get("n_cpus")
            if isinstance(load, int | float) and isinstance(cpus, int | float) and cpus > 0:
                out.append(HostSample(host, at, load_per_cpu=float(load) / float(cpus)))
        elif name == "mem":
            used = fields.get("used_percent")
            if isinstance(used, int | float):
                out.append(HostSample(host, at, mem_used_pct=float(used)))
    return out


async def handle_telemetry(ctx: Context, messages: Sequence[RawMessage]) -> int:
    now = time.time()
    samples: list[HostSample] = []
    bad: list[Rejected] = []
    for msg in messages:
        try:
            samples.extend(parse(msg.value, now))
        except ValueError as exc:
            bad.append((msg, f"telemetry: {exc}"))
    await dead_letter(ctx, bad)
    if samples:
        store = await ctx.store()
        await retrying("host load", lambda: store.record_host_load(samples))
    return len(samples)
