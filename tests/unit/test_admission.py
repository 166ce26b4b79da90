"""Property tests of the admission core: exact rate limits, no over-commit, no deadlock,
bounded waiting, fair turns, deterministic order."""

from __future__ import annotations

import random
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.core.admission import START_WAIT, AdmissionCore, Gate, Policy, QueuedJob, due_time
from agents.core.ratelimit import START_LEAD_S, Limit
from agents.core.semaphores import ALL, GLOBAL, SLOTS, needs_for

POLICY = Policy(max_wait_s=10.0)
TENANTS = ["a", "b", "c"]
KINDS = ["nomos", "monk"]


def job(
    i: int,
    tenant: str,
    kind: str = "nomos",
    *,
    at: float = 0.0,
    priority: int = 0,
    size: int = 0,
    needs: tuple[tuple[str, int], ...] | None = None,
) -> QueuedJob:
    return QueuedJob(
        due_time(at, priority, size, POLICY),
        f"j{i}",
        tenant,
        kind,
        needs if needs is not None else needs_for(kind, [], None, False),
    )


def windows_ok(times: list[float], limit: int, window: float) -> bool:
    """Brute force: no half-open window (x - W, x] holds more than ``limit`` admissions."""
    times = sorted(times)
    return all(sum(1 for t in times if x - window < t <= x) <= limit for x in times)


limits_st = st.lists(
    st.builds(
        Limit,
        scope=st.sampled_from(["tenant", "kind", "tenant_kind", "global"]),
        limit=st.integers(1, 5),
        window_s=st.sampled_from([0.5, 1.0, 2.5]),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(
    limits=limits_st,
    arrivals=st.lists(
        st.tuples(st.sampled_from(TENANTS), st.sampled_from(KINDS), st.floats(0, 0.5)),
        min_size=1,
        max_size=60,
    ),
    steps=st.lists(st.floats(0.01, 0.7), min_size=5, max_size=40),
)
def test_rate_limit_never_exceeded_in_any_window(
    limits: list[Limit], arrivals: list[tuple[str, str, float]], steps: list[float]
) -> None:
    core = AdmissionCore(POLICY, limits, {SLOTS: 10_000})
    log: dict[str, list[float]] = defaultdict(list)
    now, i = 0.0, 0
    pending = list(arrivals)
    for step in steps:
        while pending and pending[0][2] <= step:
            tenant, kind, _ = pending.pop(0)
            core.enqueue(job(i, tenant, kind, at=now))
            i += 1
        d = core.decide(now)
        for adm in d.admitted:
            for key in adm.rate_keys:
                log[key].append(now)
            core.sem.release(adm.holds)
            core.rates.starts.started(adm.job.id, now)  # each starts when admitted
        for g in d.gates.values():
            if g.kind == "rate_limit":  # a later window, or a start not reported yet
                assert (g.until is not None and g.until > now) or (
                    g.until is None and g.detail.endswith(START_WAIT)
                )
        # wake exactly when told, as the agent does, sometimes
        now = d.wake_at if (d.wake_at is not None and step > 0.3) else now + step
    by_key = {f"{lim.scope}": lim for lim in limits}  # the last limit of a scope wins
    for key, times in log.items():
        scope = key.split(":", 1)[0]
        lim = by_key[scope]
        assert windows_ok(times, lim.limit, lim.window_s), (key, times, lim)


def test_rate_limit_utilisation_when_demand_exceeds_it() -> None:
    """Waking at ``wake_at`` admits exactly N per window: nothing lost to busy retries."""
    core = AdmissionCore(POLICY, [Limit("tenant", 10, 1.0)], {SLOTS: 10_000})
    for i in range(1000):
        core.enqueue(job(i, "a"))
    now, admitted = 0.0, []
    while now < 9.999:
        d = core.decide(now)
        admitted += [now] * len(d.admitted)
        for adm in d.admitted:
            core.sem.release(adm.holds)
            core.rates.starts.started(adm.job.id, now)
        if d.wake_at is None:  # the starts it waited for are reported: a start wakes it
            assert d.admitted
            continue
        now = d.wake_at
    assert len(admitted) == 100  # 10 windows of 1 s, 10 each
    assert windows_ok(admitted, 10, 1.0)


resource_names = ["db", "api", "gpu"]
demand_st = st.lists(
    st.tuples(
        st.sampled_from(TENANTS),
        st.lists(st.sampled_from(resource_names), max_size=3, unique=True),
        st.one_of(st.none(), st.sampled_from([*resource_names, GLOBAL])),
        st.integers(1, 4),  # duration in steps
        st.integers(-20, 20),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    demands=demand_st,
    caps=st.fixed_dictionaries({r: st.integers(1, 3) for r in resource_names}),
    slots=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_semaphores_never_overcommitted_and_never_deadlocked(
    demands: list[tuple[str, list[str], str | None, int, int]],
    caps: dict[str, int],
    slots: int,
    seed: int,
) -> None:
    core = AdmissionCore(POLICY, (), {SLOTS: slots, **caps})
    durations = {}
    for i, (tenant, resources, exclusive, dur, prio) in enumerate(demands):
        j = job(i, tenant, priority=prio, needs=needs_for("nomos", resources, exclusive, False))
        core.enqueue(j)
        durations[j.id] = dur
    rng = random.Random(seed)
    running: list[tuple[int, tuple[tuple[str, int], ...]]] = []
    step = 0
    bound = sum(durations.values()) + len(demands) + 5  # serial execution is the worst case
    while len(core) or running:
        step += 1
        assert step <= bound, "no progress: deadlock or starvation"
        d = core.decide(float(step))
        for adm in d.admitted:
            running.append((step + durations[adm.job.id], adm.holds))
        for name, used in core.sem.used.items():
            assert used <= core.sem.capacity[name], (name, used)
        if not running:
            assert not len(core), f"nothing runs and {len(core)} jobs wait: {d.gates}"
        # finish what is due, in a random order
        rng.shuffle(running)
        still = []
        for end, holds in running:
            if end <= step:
                core.sem.release(holds)
            else:
                still.append((end, holds))
        running = still


def test_exclusive_job_is_not_starved_by_a_stream_of_small_jobs() -> None:
    """Bounded waiting: once due, an exclusive job reserves its scope and gets it."""
    core = AdmissionCore(POLICY, (), {SLOTS: 100, "db": 4})
    excl = job(0, "b", at=0.0, priority=-20, size=10**9, needs=needs_for("x", [], "db", False))
    core.enqueue(excl)
    running: list[tuple[float, tuple[tuple[str, int], ...]]] = []
    i = 1
    admitted_at = None
    now = 0.0
    while admitted_at is None:
        assert now < 100, "exclusive job starved"
        for _ in range(3):  # adversary: more db jobs than the db can run, every step
            core.enqueue(
                job(i, "a", at=now, priority=20, needs=needs_for("x", ["db"], None, False))
            )
            i += 1
        d = core.decide(now)
        for adm in d.admitted:
            if adm.job.id == "j0":
                admitted_at = now
                assert dict(adm.holds)["db"] == 4
            running.append((now + 1.0, adm.holds))
        running = [(e, h) for e, h in running if e > now or core.sem.release(h)]
        now += 0.5
    assert admitted_at <= POLICY.max_wait_s + 2.0


def test_a_single_job_of_a_new_tenant_waits_at_most_one_fair_turn() -> None:
    core = AdmissionCore(POLICY, (), {SLOTS: 1})
    for i in range(10_000):
        core.enqueue(job(i, "big"))
    d = core.decide(0.0)
    assert [a.job.tenant for a in d.admitted] == ["big"]
    core.enqueue(job(10_000, "small", at=0.1))
    for step in range(1, 4):
        core.sem.release(d.admitted[0].holds)
        d = core.decide(float(step))
        if d.admitted[0].job.tenant == "small":
            break
    assert d.admitted[0].job.id == "j10000"
    assert step <= 2  # at most one more turn of "big" first


def test_weights_share_slots_in_proportion() -> None:
    core = AdmissionCore(POLICY, (), {SLOTS: 30}, weights={"a": 2.0, "b": 1.0})
    for i in range(200):
        core.enqueue(job(i, "a" if i % 2 else "b"))
    d = core.decide(0.0)
    count = defaultdict(int)
    for adm in d.admitted:
        count[adm.job.tenant] += 1
    assert count == {"a": 20, "b": 10}


@settings(max_examples=100, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.integers(-20, 20), st.integers(0, 10**10)), min_size=1, max_size=30
    ),
    seed=st.integers(0, 10**6),
)
def test_order_within_a_tenant_is_by_due_then_id_whatever_the_enqueue_order(
    specs: list[tuple[int, int]], seed: int
) -> None:
    jobs = [job(i, "a", priority=p, size=s) for i, (p, s) in enumerate(specs)]
    shuffled = jobs[:]
    random.Random(seed).shuffle(shuffled)
    core = AdmissionCore(POLICY, (), {SLOTS: 1000})
    for j in shuffled:
        core.enqueue(j)
    order = [a.job.id for a in core.decide(0.0).admitted]
    assert order == [j.id for j in sorted(jobs, key=lambda j: (j.due, j.id))]


def test_priority_size_and_aging_formula() -> None:
    assert due_time(100.0, 20, 0, POLICY) == 100.0
    assert due_time(100.0, -20, 10**12, POLICY) == 110.0  # the stated maximum wait
    assert due_time(0, 0, 0, POLICY) < due_time(0, -5, 0, POLICY)
    assert due_time(0, 0, 10, POLICY) < due_time(0, 0, 10**6, POLICY)  # smaller first
    # aging: a job that waited max_wait is ahead of any job queued later, whatever its priority
    assert due_time(0, -20, 10**12, POLICY) <= due_time(10.0, 20, 0, POLICY)


def test_pause_resume_and_gates_explain() -> None:
    core = AdmissionCore(POLICY, [Limit("tenant", 1, 60.0, "b")], {SLOTS: 10, "db": 1})
    core.enqueue(job(0, "a"))
    core.enqueue(job(1, "b"))
    core.enqueue(job(2, "b"))
    core.enqueue(job(3, "c", needs=needs_for("x", ["db"], None, False)))
    core.enqueue(job(4, "c", needs=needs_for("x", ["db"], None, False)))
    core.paused.add("tenant:a")
    d = core.decide(0.0)
    assert {a.job.id for a in d.admitted} == {"j1", "j3"}
    assert d.gates["j0"].kind == "paused"
    # b's next admission waits for j1's start (held at the start: agents.core.startlimit)
    assert d.gates["j2"] == Gate("rate_limit", f"tenant:b 1/60s: {START_WAIT}")
    assert d.gates["j4"].kind == "semaphore"
    assert d.wake_at is None
    core.rates.starts.started("j1", 0.5)
    core.paused.clear()
    d = core.decide(1.0)
    assert [a.job.id for a in d.admitted] == ["j0"]
    # admitted once the window allows and shortly before j1's start + 60 s (its worker
    # holds it to that instant)
    assert d.gates["j2"].kind == "rate_limit" and d.gates["j2"].until == 60.5 - START_LEAD_S
    assert d.wake_at == 60.5 - START_LEAD_S


def test_exclusive_global_waits_for_everything_and_blocks_everything() -> None:
    core = AdmissionCore(POLICY, (), {SLOTS: 10})
    core.enqueue(job(0, "a"))
    d = core.decide(0.0)
    core.enqueue(job(1, "b", at=0.0, priority=20, needs=needs_for("x", [], GLOBAL, False)))
    core.enqueue(job(2, "c", at=0.0))
    d2 = core.decide(1.0)
    assert d2.gates["j1"].kind == "exclusive"
    assert d2.gates["j2"].kind == "reserved"  # j1 is due and reserves the global scope
    core.sem.release(d.admitted[0].holds)
    d3 = core.decide(2.0)
    assert [a.job.id for a in d3.admitted] == ["j1"]
    assert dict(d3.admitted[0].holds)[GLOBAL] > 1 and ALL not in dict(d3.admitted[0].holds)


def test_remove_reprioritize_and_drop_tenants() -> None:
    core = AdmissionCore(POLICY, (), {SLOTS: 1})
    for i in range(3):
        core.enqueue(job(i, "a"))
    assert not core.enqueue(job(0, "a"))  # idempotent
    assert core.reprioritize("j2", due_time(0.0, 20, 0, POLICY) - 1)
    assert core.remove("j1") is not None and core.remove("j1") is None
    assert [a.job.id for a in core.decide(0.0).admitted] == ["j2"]
    core.enqueue(job(9, "z"))
    assert sorted(core.drop_tenants(["z"])) == ["j0"]
    assert len(core) == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(TENANTS),
            st.sampled_from(KINDS),
            st.integers(-20, 20),
            st.sampled_from([None, "gpu", "*"]),
        ),
        min_size=1,
        max_size=40,
    ),
    limits_st,
    st.dictionaries(st.sampled_from(TENANTS), st.sampled_from([0.5, 1.0, 2.0, 3.0])),
    st.integers(1, 6),
    st.sampled_from([None, "tenant:a", "kind:monk"]),
    st.lists(st.integers(1, 7), min_size=1, max_size=6),
)
def test_inline_turns_decide_exactly_as_the_general_turn(
    specs: list[tuple[str, str, int, str | None]],
    limits: list[Limit],
    weights: dict[str, float],
    slots: int,
    pause: str | None,
    budgets: list[int],
) -> None:
    """The hot paths (a turn worth one admission taken inline; no scan for reservations
    when no kind of need queued is blocked) are optimisations only: the same admissions in
    the same order, the same gates and wake-up, round after round."""
    cores = []
    for inline in (True, False):
        core = AdmissionCore(POLICY, limits, {SLOTS: slots, "kind:monk": 2, "gpu": 1}, weights)
        core.shortcuts = inline
        if pause:
            core.paused.add(pause)
        for i, (tenant, kind, priority, special) in enumerate(specs):
            exclusive = special if special == "*" else None
            resources = [special] if special == "gpu" else []
            needs = needs_for(kind, resources, exclusive, kind == "monk")
            core.enqueue(job(i, tenant, kind, priority=priority, needs=needs))
        cores.append(core)
    now = 0.0
    for round_no, budget in enumerate(budgets * 3):
        got = [core.decide(now, max_admits=budget) for core in cores]
        fast, ref = got
        assert [(a.job.id, a.holds, a.rate_keys) for a in fast.admitted] == [
            (a.job.id, a.holds, a.rate_keys) for a in ref.admitted
        ]
        assert fast.gates == ref.gates and fast.wake_at == ref.wake_at
        for core, d in zip(cores, got, strict=True):
            for a in d.admitted[: round_no % 3]:
                core.sem.release(a.holds)
        if round_no == len(budgets) and pause:
            for core in cores:
                core.paused.discard(pause)
        now += 0.7
    assert cores[0].deficit == cores[1].deficit and list(cores[0].active) == list(cores[1].active)


def test_only_admissions_beyond_a_slot_and_the_global_share_hold_something_shared() -> None:
    from agents.core.semaphores import needs_for
    from agents.scheduler.dispatching import holds_shared

    assert not holds_shared(needs_for("noop", [], None, False))
    assert holds_shared(needs_for("scan", ["resource:licence"], None, False))
    assert holds_shared(needs_for("scan", [], None, True))  # its kind's limit
    assert holds_shared(needs_for("wipe", [], "*", False))  # all of the global scope
