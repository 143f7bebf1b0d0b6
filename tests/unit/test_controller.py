"""The controller: the M/M/c sizing formula, step limits, stabilization, bounds, validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from celery_adaptive.controller import CAUSES, Controller, children_needed, erlang_c_wait
from celery_adaptive.predictor import Forecast


def forecast(
    rate: float, service_time: float = 0.05, backlog: int = 0, at: float = 0.0
) -> Forecast:
    return Forecast(
        at=at,
        arrival_rate=rate,
        predicted_rate=rate,
        trend=0.0,
        service_time=service_time,
        backlog=backlog,
        horizon_s=1.0,
    )


def erlang_c_wait_by_factorials(servers: int, rate: float, service: float) -> float:
    """The textbook formula, for comparison with the recurrence."""
    a = rate * service
    top = a**servers / math.factorial(servers) * servers / (servers - a)
    bottom = sum(a**k / math.factorial(k) for k in range(servers)) + top
    return top / bottom * service / (servers - a)


# -- erlang_c_wait ---------------------------------------------------------------------------


def test_erlang_c_matches_known_single_and_two_server_queues() -> None:
    # M/M/1: Wq = rho * S / (1 - rho); rho = 0.8, S = 0.1 s.
    assert erlang_c_wait(1, 8.0, 0.1) == pytest.approx(0.4)
    # M/M/2 with a = 1: P(wait) = 1/3, Wq = P * S / (c - a) = 1/30 s.
    assert erlang_c_wait(2, 10.0, 0.1) == pytest.approx(1 / 30)


def test_erlang_c_is_infinite_when_unstable_and_zero_without_arrivals() -> None:
    assert erlang_c_wait(4, 80.0, 0.05) == math.inf  # load 4.0 on 4 servers
    assert erlang_c_wait(4, 100.0, 0.05) == math.inf
    assert erlang_c_wait(0, 1.0, 0.05) == math.inf
    assert erlang_c_wait(0, 0.0, 0.05) == 0.0
    assert erlang_c_wait(3, 0.0, 10.0) == 0.0
    assert erlang_c_wait(1, 100.0, 0.0) == 0.0


def test_erlang_c_stays_finite_for_thousands_of_servers() -> None:
    wait = erlang_c_wait(5000, 99_000.0, 0.05)  # load 4950: factorials would overflow
    assert math.isfinite(wait) and 0 < wait < 0.05


@given(
    st.integers(1, 30),
    st.floats(0.01, 0.99),
    st.floats(0.001, 2.0),
)
def test_erlang_c_recurrence_agrees_with_the_factorial_formula(
    servers: int, utilisation: float, service: float
) -> None:
    rate = utilisation * servers / service
    expected = erlang_c_wait_by_factorials(servers, rate, service)
    assert erlang_c_wait(servers, rate, service) == pytest.approx(expected, rel=1e-9)


@given(st.integers(0, 60), st.floats(0.0, 500.0), st.floats(0.0, 1.0))
def test_erlang_c_never_grows_with_more_servers(servers: int, rate: float, service: float) -> None:
    assert erlang_c_wait(servers + 1, rate, service) <= erlang_c_wait(servers, rate, service)


@given(st.integers(1, 60), st.floats(0.0, 500.0), st.floats(0.0, 100.0), st.floats(0.001, 1.0))
def test_erlang_c_never_shrinks_with_more_arrivals(
    servers: int, rate: float, extra: float, service: float
) -> None:
    assert erlang_c_wait(servers, rate + extra, service) >= erlang_c_wait(servers, rate, service)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((-1, 1.0, 0.1), "servers"),
        ((1, -1.0, 0.1), "arrival_rate"),
        ((1, 1.0, math.nan), "service_time"),
    ],
)
def test_erlang_c_names_bad_arguments(args: tuple[int, float, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        erlang_c_wait(*args)


# -- children_needed -------------------------------------------------------------------------


@given(st.floats(0.0, 400.0), st.floats(0.001, 0.5), st.floats(0.01, 2.0))
def test_children_needed_is_the_smallest_count_meeting_the_target(
    rate: float, service: float, target: float
) -> None:
    n = children_needed(rate, service, target)
    if rate == 0:
        assert n == 0
        return
    assert erlang_c_wait(n, rate, service) <= target
    assert n == 1 or erlang_c_wait(n - 1, rate, service) > target


def test_children_needed_for_the_briefs_example() -> None:
    # 35.1/s x 52 ms is 1.83 erlangs: 2 children wait ~0.24 s, 3 children ~0.02 s.
    assert erlang_c_wait(2, 35.1, 0.052) > 0.2
    assert children_needed(35.1, 0.052, 0.2) == 3


def test_a_backlog_counts_as_arrivals_spread_over_the_drain_horizon() -> None:
    assert children_needed(0.0, 0.05, 0.2, backlog=100, drain_s=1.0) == children_needed(
        100.0, 0.05, 0.2
    )
    assert children_needed(20.0, 0.05, 0.2, backlog=100, drain_s=2.0) == children_needed(
        70.0, 0.05, 0.2
    )
    # 100 queued tasks of 50 ms to clear within 1 s need at least 5 children more than none.
    assert children_needed(20.0, 0.05, 0.2, backlog=100) >= children_needed(20.0, 0.05, 0.2) + 4


def test_tasks_still_in_the_broker_are_cleared_within_the_target_wait() -> None:
    # 10 tasks of 200 ms in the pool's queue: spread over the 1 s drain horizon. The same 10
    # still in the broker (the prefetch is full): within the 200 ms target, so 5x the rate.
    assert children_needed(0.0, 0.2, 0.2, urgent_backlog=10) == children_needed(50.0, 0.2, 0.2)
    assert children_needed(0.0, 0.2, 0.2, backlog=10) == children_needed(10.0, 0.2, 0.2)
    c = Controller(min_children=1, max_children=32)
    seen = dataclasses.replace(forecast(0.0, 0.2, backlog=10), broker_backlog=0)
    unseen = dataclasses.replace(forecast(0.0, 0.2, backlog=10), broker_backlog=10)
    assert c.decide(0.0, unseen, current=1).target > c.decide(0.0, seen, current=1).target
    assert "(10 in the broker)" in c.decide(0.1, unseen, current=1).reason


def test_a_queue_whose_oldest_task_is_late_is_cleared_within_the_target() -> None:
    # 100/s of 10 ms tasks with 20 queued: a momentary clump is spread over the drain horizon;
    # once the oldest has waited half the 200 ms target, the queue must clear within it.
    c = Controller(min_children=1, max_children=32)
    fresh = dataclasses.replace(forecast(100.0, 0.01, backlog=20), oldest_wait_s=0.02)
    late = dataclasses.replace(forecast(100.0, 0.01, backlog=20), oldest_wait_s=0.12)
    assert c.decide(0.0, fresh, current=2).desired == children_needed(100.0, 0.01, 0.2, backlog=20)
    d = c.decide(0.1, late, current=2)
    assert d.desired == children_needed(100.0, 0.01, 0.2, urgent_backlog=20) > 2
    assert "oldest waiting 120 ms" in d.reason


@given(st.floats(0.0, 200.0), st.integers(0, 1000), st.integers(0, 1000))
def test_children_needed_never_shrinks_with_a_longer_backlog(rate: float, q1: int, q2: int) -> None:
    low, high = sorted((q1, q2))
    assert children_needed(rate, 0.05, 0.2, backlog=high) >= children_needed(
        rate, 0.05, 0.2, backlog=low
    )


def test_children_needed_stops_searching_at_the_limit() -> None:
    assert children_needed(1e9, 1.0, 0.2, limit=10) == 10
    assert children_needed(10.0, 0.05, 0.2, limit=10) == children_needed(10.0, 0.05, 0.2) < 10


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"target_wait_s": 0.0}, "target_wait_s"),
        ({"target_wait_s": -1.0}, "target_wait_s"),
        ({"backlog": -1}, "backlog"),
        ({"drain_s": 0.0}, "drain_s"),
        ({"limit": -1}, "limit"),
        ({"arrival_rate": math.inf}, "arrival_rate"),
        ({"service_time": -0.1}, "service_time"),
    ],
)
def test_children_needed_names_bad_arguments(kwargs: dict[str, float], name: str) -> None:
    args: dict[str, float] = {"arrival_rate": 10.0, "service_time": 0.05, "target_wait_s": 0.2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        children_needed(**args)  # type: ignore[arg-type]


# -- Controller ------------------------------------------------------------------------------


def test_scales_up_at_once_and_says_why_in_a_sentence() -> None:
    c = Controller(min_children=1, max_children=16)
    d = c.decide(0.0, forecast(35.1, 0.052), current=2)
    assert (d.direction, d.current, d.desired, d.target) == ("up", 2, 3, 3)
    assert d.reason == (
        "up 2->3: forecast 35.1/s x 52 ms with backlog 0 needs 3 children for wait <= 200 ms"
    )


def test_a_burst_with_a_backlog_jumps_straight_to_its_need() -> None:
    c = Controller(min_children=1, max_children=32)
    d = c.decide(0.0, forecast(100.0, 0.05, backlog=60), current=1)
    assert d.target == children_needed(100.0, 0.05, 0.2, backlog=60) == d.desired
    assert d.target >= 9  # 160/s x 50 ms = 8 erlangs


def test_scale_up_is_bounded_by_max_step_up() -> None:
    c = Controller(min_children=1, max_children=32, max_step_up=2)
    d = c.decide(0.0, forecast(200.0), current=3)
    assert (d.direction, d.target) == ("up", 5)
    assert d.desired > 5
    assert "step limited to +2" in d.reason


def test_the_target_is_clamped_to_the_maximum() -> None:
    c = Controller(min_children=1, max_children=4)
    d = c.decide(0.0, forecast(10_000.0), current=1)
    assert (d.target, d.desired) == (4, 4)
    assert "needs more than the maximum 4" in d.reason


def test_no_load_keeps_the_minimum() -> None:
    c = Controller(min_children=2, max_children=8)
    d = c.decide(0.0, forecast(0.0), current=2)
    assert (d.direction, d.target, d.desired) == ("hold", 2, 2)
    assert "kept at the minimum 2" in d.reason


def test_scale_down_waits_for_the_whole_stabilization_window_then_steps_by_one() -> None:
    c = Controller(min_children=1, max_children=16, stabilization_s=30.0)
    current = c.decide(0.0, forecast(200.0), current=1).target
    assert current > 5
    decisions = []
    for t in range(1, 40):
        d = c.decide(float(t), forecast(0.0, at=t), current)
        decisions.append(d)
        current = d.target
    held = [d for d in decisions if d.at < 30.0]
    assert all(
        d.direction == "hold" and "were needed within the last 30 s" in d.reason for d in held
    )
    downs = [d for d in decisions if d.direction == "down"]
    assert downs[0].at == 30.0
    assert all(d.current - d.target == 1 for d in downs)
    assert downs[0].reason.startswith(f"down {downs[0].current}->{downs[0].target}: demand stayed")


def test_a_single_busy_tick_restarts_the_stabilization_window() -> None:
    c = Controller(min_children=1, max_children=16, stabilization_s=10.0)
    current = c.decide(0.0, forecast(100.0), current=1).target
    for t in range(1, 9):
        current = c.decide(float(t), forecast(0.0), current).target
    assert c.decide(9.0, forecast(100.0), current).direction == "hold"  # demand is back
    for t in range(10, 19):
        assert c.decide(float(t), forecast(0.0), current).direction == "hold"
    assert c.decide(19.0, forecast(0.0), current).direction == "down"


def test_a_new_controller_does_not_shrink_before_a_full_window_of_evidence() -> None:
    c = Controller(min_children=1, max_children=8, stabilization_s=30.0)
    assert c.decide(100.0, forecast(0.0), current=8).direction == "hold"
    assert c.decide(129.0, forecast(0.0), current=8).direction == "hold"
    d = c.decide(130.0, forecast(0.0), current=8)
    assert (d.direction, d.target) == ("down", 7)


def test_without_stabilization_scale_down_is_immediate_and_bounded_by_max_step_down() -> None:
    c = Controller(min_children=1, max_children=16, stabilization_s=0.0, max_step_down=3)
    d = c.decide(0.0, forecast(0.0), current=10)
    assert (d.direction, d.target) == ("down", 7)


def test_lowering_the_maximum_shrinks_at_once() -> None:
    c = Controller(min_children=1, max_children=16)
    current = c.decide(0.0, forecast(200.0), current=1).target
    c.set_bounds(1, 3)
    d = c.decide(1.0, forecast(200.0), current)
    assert (d.direction, d.target) == ("down", 3)
    assert "above the maximum 3" in d.reason


def test_raising_the_minimum_grows_at_once_even_past_the_step_limit() -> None:
    c = Controller(min_children=1, max_children=16, max_step_up=1)
    c.set_bounds(6, 16)
    d = c.decide(0.0, forecast(0.0), current=2)
    assert (d.direction, d.target) == ("up", 6)
    assert "below the minimum 6" in d.reason


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"min_children": 0}, "min_children"),
        ({"min_children": 5, "max_children": 4}, "max_children"),
        ({"target_wait_s": 0.0}, "target_wait_s"),
        ({"target_wait_s": math.nan}, "target_wait_s"),
        ({"stabilization_s": -1.0}, "stabilization_s"),
        ({"max_step_up": 0}, "max_step_up"),
        ({"max_step_down": 0}, "max_step_down"),
        ({"drain_s": 0.0}, "drain_s"),
    ],
)
def test_bad_controller_arguments_are_named(kwargs: dict[str, float], name: str) -> None:
    args: dict[str, float] = {"min_children": 1, "max_children": 8}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        Controller(**args)  # type: ignore[arg-type]


def test_bad_bounds_and_decide_arguments_are_named() -> None:
    c = Controller(min_children=1, max_children=8)
    with pytest.raises(ValueError, match="min_children"):
        c.set_bounds(0, 8)
    with pytest.raises(ValueError, match="max_children"):
        c.set_bounds(4, 2)
    with pytest.raises(ValueError, match="current"):
        c.decide(0.0, forecast(1.0), current=-1)
    c.decide(5.0, forecast(1.0), current=1)
    with pytest.raises(ValueError, match="now"):
        c.decide(4.0, forecast(1.0), current=1)


def test_a_decision_is_frozen() -> None:
    d = Controller(min_children=1, max_children=2).decide(0.0, forecast(1.0), current=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.target = 2  # type: ignore[misc]


steps = st.lists(
    st.tuples(
        st.floats(0.0, 5.0),  # seconds since the previous decision
        st.floats(0.0, 500.0),  # predicted rate
        st.floats(0.0, 0.5),  # service time
        st.integers(0, 300),  # backlog
    ),
    min_size=1,
    max_size=80,
)


@given(
    steps,
    st.integers(1, 5),
    st.integers(0, 20),
    st.sampled_from([None, 1, 3]),
    st.integers(1, 3),
    st.floats(0.0, 20.0),
)
def test_decisions_stay_in_bounds_respect_steps_and_never_shrink_right_after_growing(
    sequence: list[tuple[float, float, float, int]],
    low: int,
    span: int,
    step_up: int | None,
    step_down: int,
    stabilization: float,
) -> None:
    high = low + span
    c = Controller(
        min_children=low,
        max_children=high,
        stabilization_s=stabilization,
        max_step_up=step_up,
        max_step_down=step_down,
    )
    now, current, last_up = 0.0, low, -math.inf
    for gap, rate, service, backlog in sequence:
        now += gap
        d = c.decide(now, forecast(rate, service, backlog, at=now), current)
        assert low <= d.target <= high
        assert low <= d.desired <= high
        assert d.current == current
        assert d.direction == (
            "up" if d.target > current else "down" if d.target < current else "hold"
        )
        if d.direction == "up":
            assert step_up is None or d.target - current <= step_up
            last_up = now
        if d.direction == "down":
            assert current - d.target <= step_down
            # Demand that justified growing stays in the window for stabilization_s.
            assert now - last_up >= stabilization
        assert d.reason.startswith(f"{d.direction} {current}")
        assert d.cause in CAUSES  # a bounded set: a metric label
        current = d.target


# -- utilization floor -------------------------------------------------------------------------
def test_children_are_kept_under_the_utilization_ceiling_while_load_lasts() -> None:
    # One child busy 60% of the time meets a 200 ms mean wait with 10 ms tasks (Erlang C says
    # 1), but its slowest tasks wait ~100 ms; at most 50% busy each takes 2.
    assert children_needed(60.0, 0.01, 0.2) == 1
    loaded = dataclasses.replace(forecast(60.0, 0.01), current_rate=60.0)
    capped = Controller(min_children=1, max_children=8, max_utilization=0.5)
    assert capped.decide(0.0, loaded, 1).target == 2
    assert "under 50% busy" in capped.decide(0.1, loaded, 2).reason
    uncapped = Controller(min_children=1, max_children=8)
    assert uncapped.decide(0.0, loaded, 1).target == 1
    # Once the load has stopped (a silence improbable for the forecast) there is no floor.
    stopped = dataclasses.replace(loaded, predicted_rate=0.0, quiet_s=1.5)
    assert capped.decide(0.2, stopped, 2).desired == 1


@pytest.mark.parametrize("share", [0.0, 1.5, math.nan])
def test_a_utilization_ceiling_outside_0_1_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="max_utilization"):
        Controller(min_children=1, max_children=8, max_utilization=share)


# -- causes: one word from a fixed set, for metric labels ------------------------------------
def test_each_decision_names_its_cause() -> None:
    c = Controller(min_children=1, max_children=16, stabilization_s=2.0)
    assert c.decide(0.0, forecast(35.0, 0.05), current=1).cause == "forecast"
    assert c.decide(1.0, forecast(35.0, 0.05), current=2).cause == "steady"
    assert c.decide(1.5, forecast(0.0, at=1.5), current=2).cause == "stabilizing"
    assert c.decide(3.5, forecast(0.0, at=3.5), current=2).cause == "lower_demand"
    stopped = dataclasses.replace(forecast(0.0, at=6.0), quiet_s=2.0)
    assert c.decide(6.0, stopped, current=3).cause == "load_stopped"
    late = dataclasses.replace(forecast(1.0, 0.05, backlog=4, at=7.0), oldest_wait_s=0.15)
    assert c.decide(7.0, late, current=1).cause == "late_queue"
    busy = dataclasses.replace(forecast(60.0, 0.01, at=8.0), current_rate=60.0)
    capped = Controller(min_children=1, max_children=8, max_utilization=0.5)
    assert capped.decide(8.0, busy, current=1).cause == "utilization"
    c.set_bounds(4, 16)
    assert c.decide(9.0, forecast(0.0, at=9.0), current=2).cause == "below_minimum"
    c.set_bounds(1, 2)
    assert c.decide(10.0, forecast(0.0, at=10.0), current=4).cause == "above_maximum"
