"""Property tests of the dependency core (agents.core.deps): random DAGs, random arrival and
completion orders, duplicated completions."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.core.deps import (
    FAILED,
    SUCCEEDED,
    TERMINAL,
    DependencyIndex,
    Edge,
    Fail,
    Needs,
    Node,
    Release,
    Rule,
    Wait,
    edges_for,
)

GRACE = 1000.0


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[tuple[str, tuple[Edge, ...]]], set[str], int]:
    n = draw(st.integers(1, 25))
    jobs = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), max_size=4, unique=True)) if i else []
        rule = draw(st.sampled_from(list(Rule)))
        jobs.append((f"j{i}", edges_for([f"j{d}" for d in deps], rule)))
    failing = set(draw(st.lists(st.sampled_from([j for j, _ in jobs]), max_size=n)))
    seed = draw(st.integers(0, 2**32))
    return jobs, failing, seed


def simulate(
    jobs: list[tuple[str, tuple[Edge, ...]]], failing: set[str], seed: int
) -> tuple[dict[str, str], list[str], dict[str, int]]:
    """Submit in random order, run released jobs in random order (each may report twice),
    and return final states, release order and how often each job was decided terminal."""
    rng = random.Random(seed)
    index = DependencyIndex()
    pending_submit = jobs[:]
    rng.shuffle(pending_submit)
    runnable: list[str] = []
    released: list[str] = []
    final: dict[str, str] = {}
    decided: dict[str, int] = {}

    def apply(decisions: list[object]) -> None:
        for d in decisions:
            if isinstance(d, Release):
                assert d.job not in released, "released twice"
                released.append(d.job)
                runnable.append(d.job)
            elif isinstance(d, Fail):
                final[d.job] = FAILED
                decided[d.job] = decided.get(d.job, 0) + 1

    while pending_submit or runnable:
        if pending_submit and (not runnable or rng.random() < 0.5):
            job, edges = pending_submit.pop()
            index.put(Node(job, "waiting", edges, submitted_at=0.0))
            apply(index.settle([job], now=0.0, grace_s=GRACE))
            continue
        job = runnable.pop(rng.randrange(len(runnable)))
        # the job may run only when its edges are satisfied at this moment
        for e in index.nodes[job].edges:
            dep_state = final.get(e.dep)
            assert dep_state in TERMINAL, f"{job} ran before {e.dep} finished"
            if e.needs == Needs.SUCCESS:
                assert dep_state == SUCCEEDED, f"{job} ran though {e.dep} {dep_state}"
        outcome = FAILED if job in failing else SUCCEEDED
        final[job] = outcome
        decided[job] = decided.get(job, 0) + 1
        for _ in range(rng.choice([1, 1, 2, 3])):  # duplicated completion events
            index.finished(job, outcome)
            apply(index.settle([job], now=0.0, grace_s=GRACE))
    return final, released, decided


@settings(max_examples=300, deadline=None)
@given(dags())
def test_no_job_before_its_dependencies_and_exactly_one_terminal_state(case: tuple) -> None:
    jobs, failing, seed = case
    final, _released, decided = simulate(jobs, failing, seed)
    assert set(final) == {j for j, _ in jobs}, "every job reaches a terminal state"
    assert all(c == 1 for c in decided.values()), "exactly one terminal decision per job"


@settings(max_examples=300, deadline=None)
@given(dags())
def test_failure_reaches_exactly_the_transitive_success_dependents(case: tuple) -> None:
    jobs, failing, seed = case
    final, released, _ = simulate(jobs, failing, seed)
    edges = dict(jobs)
    # expected: a job is failed-by-dependency iff a success edge leads to a non-success job
    expected: dict[str, str] = {}
    for job, es in jobs:  # jobs are in topological order
        blocked = any(e.needs == Needs.SUCCESS and expected[e.dep] != SUCCEEDED for e in es)
        if blocked:
            expected[job] = "dep-failed"
        else:
            expected[job] = FAILED if job in failing else SUCCEEDED
    for job in edges:
        if expected[job] == "dep-failed":
            assert job not in released and final[job] == FAILED
        else:
            assert job in released and final[job] == expected[job]


def test_arrival_order_does_not_matter_a_finished_dependency_counts() -> None:
    index = DependencyIndex.of([Node("a", SUCCEEDED)])
    index.put(Node("b", "waiting", edges_for(["a"], Rule.ALL_SUCCESS)))
    assert index.settle(["b"], 0, GRACE) == [Release("b")]


def test_root_cause_is_named_through_a_chain() -> None:
    index = DependencyIndex()
    index.put(Node("unpack", "running"))
    index.put(Node("adj2nest", "waiting", edges_for(["unpack"], Rule.ALL_SUCCESS)))
    index.put(Node("nomos", "waiting", edges_for(["adj2nest"], Rule.ALL_SUCCESS)))
    index.put(Node("report", "waiting", edges_for(["nomos"], Rule.ALL_DONE)))
    index.finished("unpack", FAILED)
    decisions = {d.job: d for d in index.settle(["unpack"], 0, GRACE)}
    assert decisions["adj2nest"] == Fail("adj2nest", "unpack", "dependency unpack failed")
    assert decisions["nomos"] == Fail(
        "nomos", "unpack", "dependency adj2nest failed because unpack did not succeed"
    )
    assert decisions["report"] == Release("report"), "all_done runs after failures"


def test_missing_dependency_waits_then_fails_after_grace() -> None:
    index = DependencyIndex()
    index.put(Node("b", "waiting", edges_for(["ghost", "a"], Rule.ALL_SUCCESS), submitted_at=0))
    index.put(Node("a", "running"))
    (d,) = index.settle(["b"], now=10, grace_s=60)
    assert isinstance(d, Wait) and d.missing == ("ghost",) and d.pending == ("a",)
    assert "not yet submitted: ghost" in d.gate
    (d,) = index.settle(["b"], now=61, grace_s=60)
    assert d == Fail("b", "ghost", "dependency ghost was not submitted within 60 s")


def test_a_workflow_job_with_a_dependency_nobody_submitted_is_rejected_at_once() -> None:
    """A workflow names its own jobs and jobs that exist: a name that is neither is a typo,
    rejected in the cycle that inserts it (its dependents fail with it), not after 24 h."""
    index = DependencyIndex()
    index.put(Node("a", "succeeded"))  # submitted before the workflow: fine
    index.put(Node("w-b", "waiting", edges_for(["a", "w-c"], Rule.ALL_SUCCESS), closed=True))
    index.put(Node("w-x", "waiting", edges_for(["w-tpyo"], Rule.ALL_SUCCESS), closed=True))
    index.put(Node("w-y", "waiting", edges_for(["w-x"], Rule.ALL_SUCCESS), closed=True))
    index.put(Node("w-c", "waiting", closed=True))
    got = {d.job: d for d in index.settle(["w-b", "w-x", "w-y", "w-c"], now=0, grace_s=86_400)}
    assert isinstance(got["w-c"], Release) and isinstance(got["w-b"], Wait)
    bad = got["w-x"]
    assert isinstance(bad, Fail) and bad.rejected and bad.root == "w-tpyo"
    assert "neither a job of its workflow nor a submitted job" in bad.reason
    follow = got["w-y"]
    assert isinstance(follow, Fail) and not follow.rejected and follow.root == "w-tpyo"


def test_a_cycle_fails_its_members_and_their_dependents() -> None:
    index = DependencyIndex()
    index.put(Node("a", "waiting", edges_for(["c"], Rule.ALL_SUCCESS)))
    index.put(Node("b", "waiting", edges_for(["a"], Rule.ALL_SUCCESS)))
    index.put(Node("c", "waiting", edges_for(["b"], Rule.ALL_SUCCESS)))
    index.put(Node("d", "waiting", edges_for(["c"], Rule.ALL_DONE)))
    assert index.cycle_members() == {"a", "b", "c"}
    decisions = {d.job: d for d in index.settle(["c"], 0, GRACE)}
    assert {j for j, d in decisions.items() if isinstance(d, Fail)} == {"a", "b", "c"}
    assert all(decisions[j].rejected for j in "abc")  # type: ignore[union-attr]
    assert decisions["d"] == Release("d")


def test_order_edges_only_sequence() -> None:
    edges = edges_for([], Rule.ALL_SUCCESS, order_after="prev")
    assert edges == (Edge("prev", Needs.DONE),)
    index = DependencyIndex.of([Node("prev", FAILED), Node("next", "waiting", edges)])
    assert index.settle(["next"], 0, GRACE) == [Release("next")]


def test_cross_tenant_dependencies_fail_unless_allowed() -> None:
    nodes = [
        Node("x", SUCCEEDED, tenant="globex"),
        Node("y", "waiting", edges_for(["x"], Rule.ALL_SUCCESS), tenant="acme"),
    ]
    (d,) = DependencyIndex.of(nodes).settle(["y"], 0, GRACE)
    assert isinstance(d, Fail) and "belongs to another tenant ('globex', not 'acme')" in d.reason
    nodes[1].state = "waiting"
    assert DependencyIndex.of(nodes, allow_cross_tenant=True).settle(["y"], 0, GRACE) == [
        Release("y")
    ]
