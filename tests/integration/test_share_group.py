"""Workers that take dispatches through a Kafka share group (``worker_dispatch = "share"``),
on the real broker, as separate processes: three workers on a one-partition pool all run
jobs at once (a consumer group gives the partition to one of them), and a worker killed
mid-job has its job run again exactly once."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agents.settings import Settings
from streams.events import JobSpec
from streams.kafka import apply_topics
from streams.publisher import JobPublisher
from streams.topics import DEFAULT_TOPICS_FILE, load_topics
from tests.helpers import eventually
from tests.integration.test_workers import (
    attempts_file,
    cluster,
    count_in,
    db,
    job,
    worker_id,
    worker_settings,
)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def shared(
    settings: Settings, kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> Iterator[tuple[Settings, JobPublisher]]:
    """Settings with ``worker_dispatch = "share"`` and topics of their own whose dispatch
    topic has a single partition (under the test's prefix: the ``registry`` fixture deletes
    them afterwards), and a publisher to them."""
    doc = yaml.safe_load(DEFAULT_TOPICS_FILE.read_text())
    doc["topics"]["jobs.dispatch"]["partitions"] = 1
    path = tmp_path / "topics.yaml"
    path.write_text(yaml.safe_dump(doc))
    own = f"{prefix}one."
    reg = load_topics(path, prefix=own)
    apply_topics(reg, kafka_bootstrap)
    s = worker_settings(settings).replace(
        worker_dispatch="share", topics_file=str(path), topic_prefix=own, app_id=own.rstrip(".")
    )
    with JobPublisher(kafka_bootstrap, registry=reg) as pub:
        yield s, pub


def running_at_once(s: Settings, ids: list[str]) -> dict[str, int]:
    """Per worker, the most of these jobs it ran at one time (from the recorded starts and
    ends)."""
    rows = db(
        s,
        "SELECT worker, started_at, finished_at FROM jobs WHERE id = ANY(%s)",
        ids,
    )
    spans = [(str(w), a, b) for w, a, b in rows]
    out: dict[str, int] = {}
    for w, a, _ in spans:
        here = sum(1 for v, c, d in spans if v == w and c <= a < d)
        out[w] = max(out.get(w, 0), here)
    return out


def test_three_workers_on_a_one_partition_pool_all_run_jobs_at_once(
    shared: tuple[Settings, JobPublisher], tmp_path: Path
) -> None:
    s, publisher = shared
    ids = [f"q{i}" for i in range(12)]
    with cluster(s, tmp_path, workers=3, slots=2) as (_, procs):
        wids = [worker_id(s, p) for p in procs]
        publisher.submit_many(
            JobSpec(id=i, tenant=f"t{n % 4}", kind="sleep", args={"seconds": "2"})
            for n, i in enumerate(ids)
        )
        eventually(
            lambda: count_in(s, ids, "running") == 6,
            60,
            what="six jobs running on three workers of two slots",
        )
        running = dict(
            db(
                s,
                "SELECT worker, count(*) FROM jobs WHERE id = ANY(%s) "
                "AND state = 'running' GROUP BY 1",
                ids,
            )
        )
        eventually(lambda: count_in(s, ids, "succeeded") == len(ids), 90, what="all done")
    assert running == {w: 2 for w in wids}, running  # every worker, every slot, one partition
    assert set(running_at_once(s, ids)) == set(wids)
    counts = db(
        s, "SELECT count(*) FROM job_history WHERE job_id = ANY(%s) AND event = 'started'", ids
    )
    assert counts[0][0] == len(ids)  # each started once


def test_a_worker_killed_mid_job_has_its_job_run_again_exactly_once(
    shared: tuple[Settings, JobPublisher], tmp_path: Path
) -> None:
    s, publisher = shared
    out = tmp_path / "attempts"
    with cluster(s, tmp_path, workers=2, slots=1) as (_, procs):
        wids = {worker_id(s, p): p for p in procs}
        publisher.submit(
            JobSpec(id="k", tenant="acme", kind="mark", args={"out": str(out), "seconds": "3"})
        )
        first = eventually(
            lambda: (j := job(s, "k")).get("state") == "running" and j["worker"],
            60,
            what="running",
        )
        eventually(lambda: len(attempts_file(out)) == 2, 30, what="the first run began")
        victim = wids[str(first)]
        victim.p.send_signal(signal.SIGKILL)
        victim.p.wait(10)
        done = eventually(
            lambda: (j := job(s, "k")).get("state") == "succeeded" and j, 90, what="retried"
        )
        time.sleep(2)  # a second run of either attempt would show in the file by now
    assert done["attempt"] == 2 and done["worker"] != first
    runs = attempts_file(out)[::2]
    assert runs == ["1", "2"], runs  # attempt 1 on the killed worker, attempt 2 once elsewhere
