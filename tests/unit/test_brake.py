"""Property tests of the host-load brake (agents.core.brake)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agents.core.brake import BrakeState, HostSample, Thresholds, overload, step

T = Thresholds(stale_after_s=10)
samples = st.lists(
    st.builds(
        HostSample,
        st.sampled_from(["a", "b", "c"]),
        st.floats(0, 30),
        st.one_of(st.none(), st.floats(0, 100)),
        st.one_of(st.none(), st.floats(0, 5)),
        st.one_of(st.none(), st.floats(0, 100)),
    ),
    max_size=5,
)


@given(st.lists(samples, min_size=1, max_size=30), st.integers(1, 64), st.floats(0, 40))
def test_target_stays_in_bounds_and_moves_the_right_way(
    rounds: list[list[HostSample]], static: int, now: float
) -> None:
    state = BrakeState(None)
    for round_samples in rounds:
        before = static if state.target is None else state.target
        state = step(state, static, round_samples, now, T)
        after = static if state.target is None else state.target
        assert min(T.floor, static) <= after <= static
        fresh = [s for s in round_samples if now - s.at <= T.stale_after_s]
        if not fresh:
            assert state.target is None
        elif any(overload(s, T) for s in fresh):
            assert after <= before
        else:
            assert after >= before


def test_overload_halves_then_recovery_adds_one_per_step() -> None:
    hot = [HostSample("h", 100.0, cpu_busy_pct=99)]
    cool = [HostSample("h", 100.0, cpu_busy_pct=10)]
    s = BrakeState(None)
    targets = []
    for _ in range(4):
        s = step(s, 16, hot, 100.0, T)
        targets.append(s.target)
    assert targets == [8, 4, 2, 1] and "cpu 99% busy" in s.reason
    s = step(s, 16, cool, 100.0, T)
    assert s.target == 2
    assert step(s, 16, cool, 200.0, T).target is None  # telemetry stale: static again
