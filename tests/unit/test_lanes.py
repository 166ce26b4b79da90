"""Property tests of the hot cycle's lanes (agents.core.lanes): what a cycle takes of what
was fetched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agents.core.lanes import Lanes

INTAKE = ("jobs.independent", "jobs.dependent")
TOPICS = (*INTAKE, "jobs.events", "jobs.ready")


@dataclass(frozen=True)
class Msg:
    topic: str
    partition: int
    offset: int


# a run of the cycle loop: fetches (topic/partition of each message), cycle limits, revocations
steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("fetch"),
            st.lists(st.tuples(st.sampled_from(TOPICS), st.integers(0, 2)), max_size=30),
        ),
        st.tuples(st.just("take"), st.integers(0, 12)),
        st.tuples(
            st.just("drop"),
            st.sets(st.tuples(st.sampled_from(TOPICS), st.integers(0, 2)), max_size=3),
        ),
    ),
    max_size=40,
)


@given(steps)
def test_a_partition_leaves_in_order_once_and_as_a_prefix(run: list[tuple[str, Any]]) -> None:
    lanes: Lanes[Msg] = Lanes(INTAKE)
    next_offset: dict[tuple[str, int], int] = {}
    handled: dict[tuple[str, int], list[int]] = {}
    dropped: set[tuple[str, int, int]] = set()
    added: list[Msg] = []
    for step, arg in run:
        if step == "fetch":
            batch = []
            for topic, part in arg:
                off = next_offset.get((topic, part), 0)
                next_offset[(topic, part)] = off + 1
                batch.append(Msg(topic, part, off))
            lanes.add(batch)
            added += batch
        elif step == "take":
            limit = max(1, arg)
            urgent_before, intake_before = len(lanes.urgent), len(lanes.intake)
            taken = lanes.take(limit)
            urgent = [m for m in taken if m.topic not in INTAKE]
            intake = [m for m in taken if m.topic in INTAKE]
            # urgent first, up to the limit; submissions fill the rest, at least a quarter
            assert taken == urgent + intake
            assert len(urgent) == min(limit, urgent_before)
            room = max(limit - len(urgent), limit // 4, 1)
            assert len(intake) == min(room, intake_before)
            for m in taken:
                handled.setdefault((m.topic, m.partition), []).append(m.offset)
        else:
            before = list(lanes.urgent) + list(lanes.intake)
            lanes.drop(arg)
            for m in before:
                if (m.topic, m.partition) in arg:
                    dropped.add((m.topic, m.partition, m.offset))
            assert all((m.topic, m.partition) not in arg for m in lanes.urgent)
            assert all((m.topic, m.partition) not in arg for m in lanes.intake)
    left = list(lanes.urgent) + list(lanes.intake)
    for offsets in handled.values():
        assert offsets == sorted(set(offsets)), "in order, each once"
    # every message added is handled, still waiting, or dropped with its partition: once
    seen = [(m.topic, m.partition, m.offset) for m in left]
    seen += [(t, p, o) for (t, p), offs in handled.items() for o in offs]
    seen += list(dropped)
    assert sorted(seen) == sorted((m.topic, m.partition, m.offset) for m in added)
    # what was handled of a partition precedes what still waits of it (a prefix)
    for m in left:
        assert all(o < m.offset for o in handled.get((m.topic, m.partition), []))


def test_events_fetched_behind_a_burst_of_submissions_go_first() -> None:
    lanes: Lanes[Msg] = Lanes(INTAKE)
    lanes.add([Msg("jobs.independent", 0, i) for i in range(1000)])
    lanes.add([Msg("jobs.events", 0, 0), Msg("jobs.ready", 1, 0)])
    first = lanes.take(100)
    assert [m.topic for m in first[:2]] == ["jobs.events", "jobs.ready"]
    assert len(first) == 100 and len(lanes) == 902
