"""Property tests of the in-flight depth (agents.core.depth)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agents.core.depth import UNITS, WorkEstimates, slot_units, units_for

seconds = st.floats(0, 3600, allow_nan=False)
horizons = st.floats(0.01, 10, allow_nan=False)
factors = st.floats(1, 100, allow_nan=False)


@given(st.one_of(st.none(), seconds), horizons, factors)
def test_units_stay_within_a_slot_and_are_powers_of_two_below_one_horizon(
    expected: float | None, horizon: float, factor: float
) -> None:
    most = slot_units(factor)
    u = units_for(expected, horizon, most)
    assert 1 <= u <= most
    if u < UNITS:
        assert u & (u - 1) == 0
    if expected is None:
        assert u == UNITS
    elif expected >= horizon * most / UNITS:
        assert u == most  # as long as a slot's budget: one per slot, nothing buffered
    elif expected >= horizon:
        assert u >= UNITS


@given(seconds, seconds, horizons, factors)
def test_longer_jobs_never_take_less(a: float, b: float, horizon: float, factor: float) -> None:
    short, long_ = sorted((a, b))
    most = slot_units(factor)
    assert units_for(short, horizon, most) <= units_for(long_, horizon, most)


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), seconds), max_size=40), horizons)
def test_estimates_stay_within_what_was_observed(
    reports: list[tuple[str, float]], horizon: float
) -> None:
    est = WorkEstimates(horizon)
    for kind, x in reports:
        before = est.units(kind)
        changed = est.observe([(kind, x)])
        assert (kind in changed) == (est.units(kind) != before)
    for kind in ("a", "b"):
        seen = [x for k, x in reports if k == kind]
        e = est.expected(kind)
        if not seen:
            assert e is None and est.units(kind) == UNITS
        else:
            assert e is not None and min(seen) - 1e-9 <= e <= max(seen) + 1e-9


def test_no_ops_get_a_deep_pipeline_and_chunks_a_shallow_one() -> None:
    est = WorkEstimates(0.25, seed={"chunk": 0.5, "third": 0.3}, most=slot_units(2.0))
    assert est.units("chunk") == 2 * UNITS  # 0.5 s chunks: a slot's whole budget, one per slot
    assert est.units("third") == UNITS + UNITS // 4  # 1.2 horizons, up to an eighth
    assert est.units("noop") == UNITS  # not seen finishing yet: a whole slot
    est.observe([("noop", 0.0004)] * 5)
    assert est.units("noop") == 1  # 64 per slot
    est.observe([("ten_ms", 0.01)])
    assert est.units("ten_ms") == 4  # 0.01 / 0.25 of 64 = 2.56, rounded up


@given(st.lists(seconds, min_size=1, max_size=40), horizons, factors)
def test_units_move_toward_the_estimate_with_hysteresis(
    xs: list[float], horizon: float, factor: float
) -> None:
    est = WorkEstimates(horizon, most=slot_units(factor))
    for x in xs:
        before = est.units("k")
        est.observe([("k", x)])
        after, target = est.units("k"), units_for(est.expected("k"), horizon, est.most)
        # never past what the estimate gives, never away from it
        assert min(before, target) <= after <= max(before, target)


def test_a_kind_near_a_boundary_does_not_flip() -> None:
    est = WorkEstimates(0.25)
    boundary = 0.25 / 64  # 1 unit below, 2 above
    est.observe([("k", boundary * 0.9)])
    assert est.units("k") == 1
    flips = 0
    for i in range(200):
        flips += len(est.observe([("k", boundary * (1.1 if i % 2 else 0.9))]))
    assert flips == 0
