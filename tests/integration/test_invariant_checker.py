"""The invariant checker can fail: it reports a dependent that started before its
dependency's success was recorded, a double success and starts over a rate limit, and it
does not mistake a stepped worker clock (timestamps out of order, causal order intact) for
a violation."""

from __future__ import annotations

import psycopg

from agents.store.checks import check


def _seed(dsn: str, history: list[tuple[str, str]], finished_at: str, started_at: str) -> None:
    """upload-unpack → upload-nomos; ``history``: (job, event) rows in the order written;
    the jobs' own timestamps as the workers' clocks reported them."""
    with psycopg.connect(dsn) as conn:
        for jid, fin, start in (
            ("upload-unpack", finished_at, None),
            ("upload-nomos", started_at, started_at),
        ):
            conn.execute(
                "INSERT INTO jobs (id, tenant, kind, state, attempt, submitted_at, started_at,"
                " finished_at) VALUES (%s, 't', 'noop', 'succeeded', 1, now(), %s, %s)",
                (jid, start or fin, fin),
            )
        conn.execute(
            "INSERT INTO job_deps (job_id, dep_id) VALUES ('upload-nomos', 'upload-unpack')"
        )
        for jid, event in history:
            conn.execute(
                "INSERT INTO job_history (job_id, attempt, event) VALUES (%s, 1, %s)", (jid, event)
            )


def test_a_dependent_started_before_its_dependency_succeeded_is_reported(
    database_url: str,
) -> None:
    _seed(
        database_url,
        [
            ("upload-unpack", "started"),
            ("upload-nomos", "started"),  # before unpack's success was recorded
            ("upload-unpack", "succeeded"),
            ("upload-nomos", "succeeded"),
        ],
        finished_at="2026-01-01 00:00:01+00",
        started_at="2026-01-01 00:00:02+00",  # the clocks even say it was fine
    )
    out = check(database_url, settled=True)
    assert any("upload-nomos started although upload-unpack" in v for v in out), out


def test_a_stepped_clock_with_causal_order_intact_is_not_a_violation(database_url: str) -> None:
    _seed(
        database_url,
        [
            ("upload-unpack", "started"),
            ("upload-unpack", "succeeded"),
            ("upload-nomos", "started"),
            ("upload-nomos", "succeeded"),
        ],
        finished_at="2026-01-01 00:00:40+00",  # unpack's worker clock 30 s ahead
        started_at="2026-01-01 00:00:10+00",
    )
    assert check(database_url, settled=True) == []


def test_a_double_success_is_reported(database_url: str) -> None:
    _seed(
        database_url,
        [
            ("upload-unpack", "succeeded"),
            ("upload-unpack", "succeeded"),
            ("upload-nomos", "started"),
            ("upload-nomos", "succeeded"),
        ],
        finished_at="2026-01-01 00:00:01+00",
        started_at="2026-01-01 00:00:02+00",
    )
    assert "job upload-unpack succeeded 2 times" in check(database_url, settled=True)


def test_starts_over_a_rate_limit_are_reported_though_admissions_kept_it(
    database_url: str,
) -> None:
    """Three admissions a second apart (within 2 per second) whose attempts all started in
    the same half second: the limit held at admission, not at the start."""
    with psycopg.connect(database_url) as conn:
        for i, (at, started) in enumerate([(100.0, 102.0), (101.0, 102.2), (102.0, 102.4)]):
            conn.execute(
                "INSERT INTO rate_log (key, at, job_id, attempt, started_at) "
                "VALUES ('tenant:t', %s, %s, 1, %s)",
                (at, f"j{i}", started),
            )
    out = check(database_url, settled=True, limits={"tenant:t": (2, 1.0)})
    assert out == ["rate limit tenant:t (2/1s) exceeded 1 times at the start"], out
