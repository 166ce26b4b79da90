"""What an admission owner reports to the metrics after each decision: denials by gate
(every round) and the queue's depth per tenant and kind (at most once a second: it walks the
queues; a pair that emptied is reported once as 0)."""

from __future__ import annotations

from agents.core.admission import AdmissionCore, Decisions
from agents.metrics import Metrics


class AdmissionMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._depth_at = 0.0
        self._depth_seen: set[tuple[str, str]] = set()

    def record(self, core: AdmissionCore, delayed: int, d: Decisions, now: float) -> None:
        m = self.metrics
        if not m.enabled:
            return
        by_gate: dict[str, int] = {}
        for gate in d.gates.values():
            by_gate[gate.kind] = by_gate.get(gate.kind, 0) + 1
        for name, n in by_gate.items():
            m.count("admission_denials", {"gate": name}, n=n)
        if now - self._depth_at < 1.0:
            return
        self._depth_at = now
        depth: dict[tuple[str, str], int] = {}
        for q in core.queues.values():
            for job in q:
                depth[(job.tenant, job.kind)] = depth.get((job.tenant, job.kind), 0) + 1
        for (tenant, kind), n in depth.items():
            m.gauge("queue_depth", {"tenant": tenant, "kind": kind}, ready=n)
        for tenant, kind in self._depth_seen - depth.keys():
            m.gauge("queue_depth", {"tenant": tenant, "kind": kind}, ready=0)
        self._depth_seen = set(depth)
        m.gauge("admission", queued=len(core), delayed=delayed)
