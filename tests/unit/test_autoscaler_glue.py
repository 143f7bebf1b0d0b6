"""The autoscaler's glue without Celery: decisions applied through callbacks, idle pacing."""

from __future__ import annotations

from celery_adaptive.autoscaler import IDLE_TICK_FACTOR, AdaptiveAutoscaler
from celery_adaptive.settings import build_settings


def make(running: dict[str, float] | None = None) -> tuple[AdaptiveAutoscaler, list[int]]:
    settings = build_settings(
        {"adaptive_min_children": 1, "adaptive_max_children": 8, "adaptive_autoscale": True}, {}
    )
    sizes = [1]
    scaler = AdaptiveAutoscaler(
        settings,
        resize_to=lambda target, reason: sizes.append(target),
        current=lambda: sizes[-1],
        pool_backlog=lambda: 0,
        running_ages=lambda now: dict(running or {}),
    )
    return scaler, sizes


def test_an_idle_pool_at_its_minimum_ticks_less_often_and_work_restores_the_pace() -> None:
    scaler, sizes = make()
    interval = scaler.settings.control_interval
    assert scaler.next_tick_in() == interval  # nothing decided yet
    scaler.tick(100.0)
    assert sizes == [1]
    assert scaler.next_tick_in() == interval * IDLE_TICK_FACTOR
    # A burst: its first arrivals are enough to grow, and the pace is normal again.
    for i in range(6):
        scaler.record_arrival(200.0 + i * 0.01, "io")
        scaler.record_completion(200.0 + i * 0.01, "io", 0.2)
    decision = scaler.tick(200.06)
    assert decision.direction == "up" and sizes[-1] > 1
    assert scaler.next_tick_in() == interval


def test_a_running_task_keeps_the_normal_pace_even_with_no_arrivals() -> None:
    scaler, _ = make(running={"slow": 30.0})
    scaler.tick(100.0)
    assert scaler.next_tick_in() == scaler.settings.control_interval


def test_an_arrival_inside_the_gap_is_decided_at_its_end_not_dropped() -> None:
    from celery_adaptive.autoscaler import EARLY_DECISION_GAP_S

    scaler, _ = make()
    assert scaler.early_decision_at(50.0) == 50.0  # nothing decided yet: at once
    scaler.tick(100.0)
    assert scaler.early_decision_at(100.0 + EARLY_DECISION_GAP_S / 2) == 100.0 + EARLY_DECISION_GAP_S
    assert scaler.early_decision_at(100.0 + 2 * EARLY_DECISION_GAP_S) == 100.0 + 2 * EARLY_DECISION_GAP_S


def test_scale_down_steps_are_half_of_the_maximum_in_force() -> None:
    # `--autoscale 8,1` sets the bounds after the autoscaler is built (from settings whose
    # maximum may be the -c default): the step must follow the bounds, not those settings.
    settings = build_settings({"adaptive_min_children": 1, "adaptive_max_children": 2}, {})
    sizes = [8]
    scaler = AdaptiveAutoscaler(
        settings, resize_to=lambda target, reason: sizes.append(target),
        current=lambda: sizes[-1], pool_backlog=lambda: 0,
    )
    scaler.set_bounds(1, 8, 0.0)
    window = scaler.settings.stabilization_window
    decision = scaler.tick(100.0)
    decision = scaler.tick(100.0 + window + 1.0)
    assert decision.direction == "down" and decision.target == 4, decision
