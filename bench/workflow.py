"""The FOSSology-shaped upload every workflow benchmark uses (one definition for jobstream and
the peers): unpack → adj2nest → six scanners in parallel → report."""

from __future__ import annotations

SCANNERS = ["nomos", "monk", "ojo", "copyright", "keyword", "pkgagent"]


def steps() -> list[tuple[str, list[str]]]:
    """(step, the steps it depends on), in an order where dependencies come first."""
    return [
        ("unpack", []),
        ("adj2nest", ["unpack"]),
        *((s, ["adj2nest"]) for s in SCANNERS),
        ("report", list(SCANNERS)),
    ]
