"""The topic registry: ``topics.yaml`` parsed, validated and applied to a cluster.

Invariants:
- ``topics.yaml`` is the only place topic names, partition counts, retention and keys are set;
  code refers to topics by their logical name (``jobs.events``) and a :class:`TopicRegistry`
  maps it to the physical name (an optional prefix isolates tests and tenants of a cluster).
- ``apply`` creates missing topics and reports, never alters, topics whose partition count
  differs; co-partitioned topics must agree on their partition count.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from streams.errors import TopicConfigError

DEFAULT_TOPICS_FILE = Path(__file__).resolve().parent.parent / "topics.yaml"
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
REQUIRED = (
    "jobs.independent",
    "jobs.dependent",
    "jobs.events",
    "jobs.ready",
    "jobs.dispatch",
    "jobs.deadletter",
    "jobs.control",
    "workers.heartbeat",
    "scheduler.decisions",
    "telemetry.hosts",
)


def parse_duration_ms(text: str | int) -> int:
    """``"7d"`` → 604800000. Integers are milliseconds already."""
    if isinstance(text, int):
        return text
    m = _DURATION.match(str(text).strip())
    if not m:
        raise TopicConfigError(f"bad duration {text!r}: use a number with ms, s, m, h or d")
    return int(m.group(1)) * _UNITS_MS[m.group(2)]


@dataclass(frozen=True, kw_only=True)
class TopicSpec:
    name: str
    key: str
    partitions: int
    replication: int
    retention_ms: int | None = None
    compacted: bool = False
    co_partitioned_with: str | None = None
    doc: str = ""
    extra_config: dict[str, str] = field(default_factory=dict)

    def config(self, min_insync: int) -> dict[str, str]:
        cfg = {"min.insync.replicas": str(min_insync), **self.extra_config}
        cfg["cleanup.policy"] = "compact" if self.compacted else "delete"
        if self.retention_ms is not None:
            cfg["retention.ms"] = str(self.retention_ms)
        return cfg


@dataclass(frozen=True)
class TopicRegistry:
    specs: dict[str, TopicSpec]
    prefix: str = ""
    min_insync: int = 1

    def name(self, logical: str) -> str:
        """Physical topic name for a logical one; ``KeyError`` for an unknown topic."""
        return self.prefix + self.specs[logical].name

    def __getitem__(self, logical: str) -> TopicSpec:
        return self.specs[logical]

    def physical(self) -> dict[str, TopicSpec]:
        return {self.prefix + s.name: s for s in self.specs.values()}

    def with_prefix(self, prefix: str) -> TopicRegistry:
        return TopicRegistry(self.specs, prefix, self.min_insync)

    def only_pools(self, pools: Iterable[str]) -> TopicRegistry:
        """A registry of just the dispatch topics of these worker pools (``jobs.dispatch.<pool>``,
        configured like ``jobs.dispatch``), to create them on first use."""
        base = self.specs["jobs.dispatch"]
        specs = {
            f"jobs.dispatch.{p}": replace(base, name=f"{base.name}.{p}", doc=f"pool {p}")
            for p in pools
        }
        return TopicRegistry(specs, self.prefix, self.min_insync)


def load_topics(path: Path | str | None = None, prefix: str = "") -> TopicRegistry:
    path = Path(path) if path else DEFAULT_TOPICS_FILE
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TopicConfigError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise TopicConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_topics(doc, source=str(path), prefix=prefix)


def parse_topics(doc: Any, *, source: str = "topics.yaml", prefix: str = "") -> TopicRegistry:
    if not isinstance(doc, dict) or not isinstance(doc.get("topics"), dict):
        raise TopicConfigError(f"{source}: expected a mapping with a 'topics' mapping")
    defaults = doc.get("defaults") or {}
    specs: dict[str, TopicSpec] = {}
    for name, raw in doc["topics"].items():
        if not isinstance(raw, dict):
            raise TopicConfigError(f"{source}: topic {name!r} must be a mapping")
        unknown = set(raw) - {
            "key",
            "partitions",
            "replication",
            "retention",
            "compacted",
            "co_partitioned_with",
            "doc",
            "config",
        }
        if unknown:
            raise TopicConfigError(f"{source}: topic {name!r} has unknown fields {sorted(unknown)}")
        partitions = raw.get("partitions")
        if not isinstance(partitions, int) or partitions < 1:
            raise TopicConfigError(f"{source}: topic {name!r} needs partitions >= 1")
        replication = raw.get("replication", defaults.get("replication", 1))
        if not isinstance(replication, int) or replication < 1:
            raise TopicConfigError(f"{source}: topic {name!r} needs replication >= 1")
        if "key" not in raw:
            raise TopicConfigError(f"{source}: topic {name!r} must say what its key is")
        retention = raw.get("retention")
        specs[name] = TopicSpec(
            name=name,
            key=str(raw["key"]),
            partitions=partitions,
            replication=replication,
            retention_ms=parse_duration_ms(retention) if retention is not None else None,
            compacted=bool(raw.get("compacted", False)),
            co_partitioned_with=raw.get("co_partitioned_with"),
            doc=str(raw.get("doc", "")),
            extra_config={str(k): str(v) for k, v in (raw.get("config") or {}).items()},
        )
    missing = [t for t in REQUIRED if t not in specs]
    if missing:
        raise TopicConfigError(f"{source}: missing topics {missing}")
    for spec in specs.values():
        other = spec.co_partitioned_with
        if other is None:
            continue
        if other not in specs:
            raise TopicConfigError(f"{source}: {spec.name} is co-partitioned with unknown {other}")
        if specs[other].partitions != spec.partitions:
            raise TopicConfigError(
                f"{source}: {spec.name} ({spec.partitions}) and {other} "
                f"({specs[other].partitions}) are co-partitioned and need equal partition counts"
            )
    min_insync = int(defaults.get("min_insync_replicas", 1))
    return TopicRegistry(specs, prefix, min_insync)
