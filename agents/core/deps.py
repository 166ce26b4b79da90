"""The dependency core: which waiting jobs may run, which must fail, and why.

A job waits on *edges*. An edge needs its dependency to have ``succeeded`` (trigger rule
``all_success``, the default) or merely to be terminal (``all_done``, e.g. a cleanup or report
step; and every ``order_key`` edge, which only sequences jobs). :class:`DependencyIndex` holds a
working set of jobs and their edges and, given the jobs whose state changed, *settles* the
graph: it returns ``Release`` for each waiting job whose every edge is satisfied, ``Fail`` for
each waiting job with an edge that can no longer be satisfied (transitively, naming the root
cause), and ``Wait`` with what it is blocked on for the rest. It also finds cycles.

Invariants (property-tested in tests/unit/test_deps.py):
- No job is released before every one of its edges is satisfied.
- Every decision is final: a released or failed job is never decided again, so duplicated or
  reordered completions change nothing.
- A failure reaches exactly the jobs that depend on it through ``success`` edges,
  transitively; ``done`` edges let the dependent run instead.
- A dependency that never arrives fails its dependents after the grace period; nothing waits
  forever. A workflow's job whose dependency is neither in its workflow nor submitted is
  rejected at once. A cycle fails every job on it.

Pure: no I/O, no clock (``now`` is an argument), stdlib only.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class Rule(StrEnum):
    ALL_SUCCESS = "all_success"
    ALL_DONE = "all_done"


class Needs(StrEnum):
    SUCCESS = "success"
    DONE = "done"


WAITING = "waiting"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})


@dataclass(frozen=True, slots=True)
class Edge:
    dep: str
    needs: Needs = Needs.SUCCESS


@dataclass(slots=True)
class Node:
    """A job as the dependency core sees it. ``state`` is ``waiting`` until decided; any other
    non-terminal state (ready, dispatched, running) means released. ``root`` names the job
    whose failure caused this one's, when it failed for a dependency."""

    id: str
    state: str
    edges: tuple[Edge, ...] = ()
    submitted_at: float = 0.0
    root: str | None = None
    tenant: str = ""
    # a workflow's job: it names only jobs of its workflow and jobs submitted before it, so a
    # dependency not in the index will never arrive (a typo): rejected at once, not after the
    # grace period
    closed: bool = False


@dataclass(frozen=True, slots=True)
class Release:
    job: str


@dataclass(frozen=True, slots=True)
class Fail:
    """``rejected`` marks a job that could never have run as submitted (a cycle, a forbidden
    cross-tenant dependency), as opposed to one failed by its dependencies' outcomes."""

    job: str
    root: str
    reason: str
    rejected: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    job: str
    pending: tuple[str, ...]  # submitted, not finished
    missing: tuple[str, ...]  # not submitted (yet)

    @property
    def gate(self) -> str:
        parts = []
        if self.pending:
            parts.append(
                "waiting for "
                + ", ".join(self.pending[:5])
                + (f" and {len(self.pending) - 5} more" if len(self.pending) > 5 else "")
            )
        if self.missing:
            parts.append(
                "not yet submitted: "
                + ", ".join(self.missing[:5])
                + (f" and {len(self.missing) - 5} more" if len(self.missing) > 5 else "")
            )
        return "dependency: " + "; ".join(parts)


Decision = Release | Fail | Wait


def edges_for(
    depends_on: Sequence[str], rule: Rule, order_after: str | None = None
) -> tuple[Edge, ...]:
    needs = Needs.DONE if rule == Rule.ALL_DONE else Needs.SUCCESS
    edges = [Edge(d, needs) for d in dict.fromkeys(depends_on)]
    if order_after is not None and order_after not in depends_on:
        edges.append(Edge(order_after, Needs.DONE))
    return tuple(edges)


@dataclass
class DependencyIndex:
    nodes: dict[str, Node] = field(default_factory=dict)
    dependents: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    allow_cross_tenant: bool = False

    @classmethod
    def of(cls, nodes: Iterable[Node], allow_cross_tenant: bool = False) -> DependencyIndex:
        index = cls(allow_cross_tenant=allow_cross_tenant)
        for n in nodes:
            index.put(n)
        return index

    def put(self, node: Node) -> None:
        old = self.nodes.get(node.id)
        if old is not None:
            for e in old.edges:
                self.dependents[e.dep].discard(node.id)
        self.nodes[node.id] = node
        for e in node.edges:
            self.dependents[e.dep].add(node.id)

    def finished(self, job: str, state: str, root: str | None = None) -> None:
        """Record a terminal state reported for ``job`` (a no-op for a job already terminal)."""
        node = self.nodes.get(job)
        if node is None:
            self.put(Node(job, state, root=root))
        elif node.state not in TERMINAL:
            node.state = state
            node.root = root if state != SUCCEEDED else None

    def evaluate(self, node: Node, now: float, grace_s: float) -> Decision:
        pending: list[str] = []
        missing: list[str] = []
        for e in node.edges:
            dep = self.nodes.get(e.dep)
            if dep is None:
                if node.closed:
                    return Fail(
                        node.id,
                        e.dep,
                        f"dependency {e.dep} is neither a job of its workflow nor a submitted job",
                        True,
                    )
                if now - node.submitted_at > grace_s:
                    return Fail(
                        node.id, e.dep, f"dependency {e.dep} was not submitted within {grace_s:g} s"
                    )
                missing.append(e.dep)
            elif not self.allow_cross_tenant and dep.tenant != node.tenant:
                return Fail(
                    node.id,
                    e.dep,
                    f"dependency {e.dep} belongs to another tenant "
                    f"({dep.tenant!r}, not {node.tenant!r})",
                )
            elif dep.state in TERMINAL:
                if e.needs == Needs.SUCCESS and dep.state != SUCCEEDED:
                    root = dep.root or e.dep
                    why = (
                        f"dependency {e.dep} {dep.state}"
                        if root == e.dep
                        else f"dependency {e.dep} failed because {root} did not succeed"
                    )
                    return Fail(node.id, root, why)
            else:
                pending.append(e.dep)
        if pending or missing:
            return Wait(node.id, tuple(pending), tuple(missing))
        return Release(node.id)

    def settle(self, changed: Iterable[str], now: float, grace_s: float) -> list[Decision]:
        """Decide every waiting job among ``changed`` and the dependents of changed jobs,
        transitively through failures. Applies the decisions to the index and returns them."""
        decisions: dict[str, Decision] = {}  # the last decision per job wins
        queue: deque[str] = deque()
        seen: set[str] = set()

        def enqueue_with_dependents(job: str) -> None:
            for j in (job, *sorted(self.dependents.get(job, ()))):
                if j not in seen:
                    seen.add(j)
                    queue.append(j)

        for job in changed:
            enqueue_with_dependents(job)
        for job in sorted(self.cycle_members()):
            member = self.nodes[job]
            if member.state == WAITING:
                member.state, member.root = FAILED, job
                decisions[job] = Fail(job, job, "dependency cycle through " + job, True)
                seen.discard(job)
                enqueue_with_dependents(job)
        while queue:
            job = queue.popleft()
            node = self.nodes.get(job)
            if node is None or node.state != WAITING:
                continue
            d = self.evaluate(node, now, grace_s)
            decisions[job] = d
            if isinstance(d, Release):
                node.state = "ready"
            elif isinstance(d, Fail):
                node.state, node.root = FAILED, d.root
                # a failure is terminal, so each job fails at most once: this terminates
                queue.extend(sorted(self.dependents.get(job, ())))
        return list(decisions.values())

    def cycle_members(self) -> set[str]:
        """Jobs on a cycle among the waiting jobs of the index (iterative Tarjan)."""
        graph: Mapping[str, list[str]] = {
            n.id: [e.dep for e in n.edges if e.dep in self.nodes]
            for n in self.nodes.values()
            if n.state == WAITING
        }
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        on_stack: set[str] = set()
        stack: list[str] = []
        members: set[str] = set()
        counter = 0
        for root in graph:
            if root in index:
                continue
            work: list[tuple[str, int]] = [(root, 0)]
            while work:
                v, i = work.pop()
                if i == 0:
                    index[v] = low[v] = counter
                    counter += 1
                    stack.append(v)
                    on_stack.add(v)
                succ = [w for w in graph.get(v, ()) if w in graph]
                if i < len(succ):
                    work.append((v, i + 1))
                    w = succ[i]
                    if w not in index:
                        work.append((w, 0))
                    elif w in on_stack:
                        low[v] = min(low[v], index[w])
                    continue
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 or v in graph.get(v, ()):
                        members.update(comp)
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[v])
        return members
