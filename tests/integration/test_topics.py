"""Topic housekeeping on a real broker: a test's or bench run's topics are deleted by prefix,
and nothing else is."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from streams.kafka import delete_topics
from tests.helpers import eventually


def _create(bootstrap: str, names: list[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(n, 1, 1) for n in names]).values():
        fut.result(timeout=30)


def _existing(bootstrap: str) -> set[str]:
    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics)


def test_delete_topics_takes_its_prefix_and_nothing_else(kafka_bootstrap: str) -> None:
    mine = f"h{uuid.uuid4().hex[:10]}"
    other = f"h{uuid.uuid4().hex[:10]}"
    names = [f"{mine}.jobs.events", f"{mine}-table-changelog", f"{other}.jobs.events"]
    _create(kafka_bootstrap, names)
    try:
        # a created topic reaches the broker's metadata a moment after the create returns
        eventually(lambda: set(names) <= _existing(kafka_bootstrap), timeout=30)
        assert delete_topics(kafka_bootstrap, mine) == sorted(names[:2])
        eventually(lambda: not (_existing(kafka_bootstrap) & set(names[:2])), timeout=30)
        assert names[2] in _existing(kafka_bootstrap)
        assert delete_topics(kafka_bootstrap, f"{mine}.") == []  # nothing left: a no-op
    finally:
        delete_topics(kafka_bootstrap, other)


def test_delete_topics_refuses_an_empty_prefix(kafka_bootstrap: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        delete_topics(kafka_bootstrap, "")
