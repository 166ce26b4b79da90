"""The invariant checker: what must hold after any scenario, read from PostgreSQL.

    violations = check(dsn, settled=True, limits={"tenant:acme": (5, 1.0)})
    assert violations == [], violations

Checks (each violation is one line naming the job, key or resource):
- every job has one state and, when ``settled``, a terminal one (nothing left waiting, ready,
  dispatched or running);
- no job succeeded twice (``job_history``), and no job's recorded attempt exceeds its budget;
- no dependent started before a dependency it needs succeeded (``all_success`` edges) or
  finished (``all_done`` edges);
- no sliding window of any rate-limit key holds more admissions than its limit (brute force
  over ``rate_log``; ``limits`` maps a key to (limit, window_s));
- no semaphore over-committed; when settled, nothing is held and every semaphore is free;
- the dead letters match what the caller knows was rejected (``expect_dead_letters``).

Sampled while a scenario runs (:func:`owner_violations`): no job ``running`` on a worker
that is not live, and none ``dispatched`` that no live worker runs or holds buffered, beyond
a bound. From the jobs' own ledger (:func:`process_overcommit`): no resource held by more
running processes than its capacity.

Used by the reliability tests and the chaos run (``make chaos``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Mapping

import psycopg

from agents.store.rows import CONFIRMED, q


def window_violations(times: list[float], limit: int, window_s: float) -> int:
    """How many admissions found more than ``limit`` admissions in (t - W, t]."""
    times = sorted(times)
    bad = 0
    lo = 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window_s:
            lo += 1
        if hi - lo + 1 > limit:
            bad += 1
    return bad


def check(
    dsn: str,
    *,
    settled: bool = True,
    limits: Mapping[str, tuple[int, float]] | None = None,
    expect_dead_letters: int | None = None,
) -> list[str]:
    out: list[str] = []
    with psycopg.connect(dsn) as conn:
        if settled:
            for jid, state in conn.execute(
                "SELECT id, state FROM jobs WHERE state NOT IN ('succeeded', 'failed', "
                "'cancelled') ORDER BY id LIMIT 50"
            ):
                out.append(f"job {jid} is {state}, not terminal")
        for jid, n in conn.execute(
            "SELECT job_id, count(*) FROM job_history WHERE event = 'succeeded' "
            "GROUP BY job_id HAVING count(*) > 1 LIMIT 50"
        ):
            out.append(f"job {jid} succeeded {n} times")
        for jid, attempt, budget in conn.execute(
            "SELECT id, attempt, max_attempts FROM jobs WHERE attempt > max_attempts LIMIT 50"
        ):
            out.append(f"job {jid} ran attempt {attempt} of {budget}")
        for jid, dep, needs, dep_state in conn.execute(
            """SELECT j.id, d.dep_id, d.needs, coalesce(dj.state, 'missing')
               FROM jobs j JOIN job_deps d ON d.job_id = j.id
               LEFT JOIN jobs dj ON dj.id = d.dep_id
               WHERE j.started_at IS NOT NULL AND (
                   dj.id IS NULL
                   OR (d.needs = 'success' AND dj.state <> 'succeeded')
                   OR dj.state NOT IN ('succeeded', 'failed', 'cancelled')
                   -- causal order, not clocks: workers' clocks may step, so the dependent's
                   -- first start must be recorded after the dependency's last terminal
                   -- event (history rows are numbered by the database as they are written)
                   OR (SELECT min(hs.id) FROM job_history hs
                        WHERE hs.job_id = j.id AND hs.event = 'started')
                      < (SELECT max(hd.id) FROM job_history hd
                          WHERE hd.job_id = dj.id
                            AND hd.event IN ('succeeded', 'failed', 'cancelled')))
               LIMIT 50"""
        ):
            out.append(f"job {jid} started although {dep} ({needs}) was {dep_state}")
        if limits:
            times: dict[str, list[float]] = defaultdict(list)
            starts: dict[str, list[float]] = defaultdict(list)
            for key, at, started in conn.execute(
                "SELECT key, at, started_at FROM rate_log WHERE key = ANY(%s)", (list(limits),)
            ):
                times[key].append(float(at))
                if started is not None:
                    starts[key].append(float(started))
            for key, (limit, window_s) in limits.items():
                bad = window_violations(times.get(key, []), limit, window_s)
                if bad:
                    out.append(f"rate limit {key} ({limit}/{window_s:g}s) exceeded {bad} times")
                bad = window_violations(starts.get(key, []), limit, window_s)
                if bad:
                    out.append(
                        f"rate limit {key} ({limit}/{window_s:g}s) exceeded {bad} times "
                        "at the start"
                    )
        for name, cap, used, held in conn.execute(
            """SELECT s.name, s.capacity, s.used, coalesce(sum(h.amount), 0)
               FROM semaphores s LEFT JOIN job_holds h ON h.name = s.name
               GROUP BY s.name, s.capacity, s.used"""
        ):
            if name != "slots" and used > cap:
                out.append(f"semaphore {name} over-committed: {used}/{cap}")
            if used != held:
                out.append(f"semaphore {name} says {used} used, holds add up to {held}")
            if settled and used:
                out.append(f"semaphore {name} still holds {used} after the run")
        if expect_dead_letters is not None:
            row = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
            n = int(row[0]) if row else 0
            if n != expect_dead_letters:
                out.append(f"{n} dead letters, expected {expect_dead_letters}")
    return out


def owner_violations(
    dsn: str, bound_s: float, place: Callable[[str, str], str] | None = None
) -> list[str]:
    """Jobs without a live owner for longer than ``bound_s`` (the database's clock): running
    (started that long ago) or dispatched (and confirmed) but in no live worker's running or
    buffered list, and, for a dispatch still in Kafka, on a partition no live worker is
    assigned (``place(kind, job id)`` gives its ``topic[partition]``; None: every dispatch
    must be running or buffered). Live: ``running``/``draining`` and heard from within
    ``bound_s``."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            q(
                """WITH live AS (
                   SELECT id, running, buffered, assigned FROM workers
                   WHERE state IN ('running', 'draining')
                     AND last_seen > now() - make_interval(secs => %(b)s))
               SELECT j.id, j.state, j.attempt, coalesce(j.worker, '-'), j.kind,
                      (SELECT coalesce(array_agg(a), '{{}}') FROM live, unnest(live.assigned) a)
               FROM jobs j
               WHERE (j.state = 'running'
                      AND j.updated_at < now() - make_interval(secs => %(b)s)
                      AND NOT EXISTS (SELECT 1 FROM live WHERE j.id = ANY(live.running)
                                                         OR j.id = ANY(live.buffered)))
                  OR (j.state = 'dispatched' AND {confirmed}
                      AND j.dispatched_at < now() - make_interval(secs => %(b)s)
                      AND NOT EXISTS (SELECT 1 FROM live WHERE j.id = ANY(live.running)
                                                         OR j.id = ANY(live.buffered)))
               ORDER BY j.id LIMIT 50""",
                confirmed=CONFIRMED,
            ),
            {"b": bound_s},
        ).fetchall()
    out = []
    for jid, state, attempt, worker, kind, assigned in rows:
        where = place(kind, jid) if place is not None and state == "dispatched" else None
        if where is not None and where in assigned:
            continue  # still in Kafka, on a live worker's partition: it reads it in order
        out.append(
            f"job {jid} attempt {attempt} {state} without a live owner for over {bound_s:g} s "
            f"(worker {worker}{'' if where is None else ', ' + where})"
        )
    return out


def process_overcommit(
    ledger: list[str], capacity: int, excluded: Collection[int] = ()
) -> list[str]:
    """Over-commits of one resource by running processes, from a ledger its jobs write
    (``+ JOB ATTEMPT PPID`` when their process starts, ``- JOB ATTEMPT PPID`` when it ends,
    in the order written). Processes whose worker (PPID) is in ``excluded`` are not counted:
    the orphans of a worker killed or frozen past the liveness bound run on without it, which
    is documented as not promised (docs/guarantees.md)."""
    live: dict[tuple[str, str, str], int] = {}
    out: list[str] = []
    for line in ledger:
        parts = line.split()
        if len(parts) != 4 or parts[0] not in "+-":
            continue
        sign, job, attempt, ppid = parts
        if ppid.isdigit() and int(ppid) in excluded:
            continue
        key = (job, attempt, ppid)
        if sign == "+":
            live[key] = live.get(key, 0) + 1
            if sum(live.values()) > capacity:
                out.append(
                    f"{sum(live.values())} processes held a resource of {capacity}: {sorted(live)}"[
                        :500
                    ]
                )
        elif live.get(key):
            live[key] -= 1
            if not live[key]:
                del live[key]
    return out[:50]
