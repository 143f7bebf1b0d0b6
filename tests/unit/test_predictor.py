"""The predictor: windows, Holt's level and trend, service-time EWMA, validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from celery_adaptive.predictor import Forecast, Predictor


def feed_steady(p: Predictor, rate_per_s: int, start: float, end: float, name: str = "t") -> None:
    """``rate_per_s`` arrivals spread evenly over every second of ``[start, end)``."""
    step = 1.0 / rate_per_s
    k = 0
    while start + k * step < end:
        p.record_arrival(start + k * step, name)
        k += 1


def test_before_any_arrival_the_rate_is_zero_and_service_time_is_the_default() -> None:
    p = Predictor(default_service_time=0.123)
    f = p.forecast(5.0, backlog=7, horizon_s=2.0)
    assert (f.arrival_rate, f.predicted_rate, f.trend) == (0.0, 0.0, 0.0)
    assert f.service_time == 0.123
    assert (f.at, f.backlog, f.horizon_s) == (5.0, 7, 2.0)


def test_a_window_counts_only_once_it_has_closed() -> None:
    p = Predictor(window_s=1.0, level_alpha=0.5, trend_beta=0.3)
    for t in (0.1, 0.2, 0.5):
        p.record_arrival(t, "t")
    assert p.forecast(0.99, backlog=0, horizon_s=0.0).arrival_rate == 0.0
    f = p.forecast(1.0, backlog=0, horizon_s=2.0)
    # Holt from level 0: level = 0.5 * 3/s, trend = 0.3 * (1.5 - 0) per window of 1 s.
    assert f.arrival_rate == pytest.approx(1.5)
    assert f.trend == pytest.approx(0.45)
    # Extrapolated from the middle of the closed window (0.5 s ago) to 2 s ahead.
    assert f.predicted_rate == pytest.approx(1.5 + 0.45 * 2.5)


def test_holt_arithmetic_over_two_half_second_windows() -> None:
    p = Predictor(window_s=0.5, level_alpha=0.5, trend_beta=0.3)
    p.record_arrival(0.0, "t", count=2)  # 4/s in [0, 0.5)
    p.record_arrival(0.5, "t", count=4)  # 8/s in [0.5, 1.0)
    f = p.forecast(1.0, backlog=0, horizon_s=1.0)
    level1, trend1 = 2.0, 0.6
    level2 = 0.5 * 8 + 0.5 * (level1 + trend1)
    trend2 = 0.3 * (level2 - level1) + 0.7 * trend1
    assert f.arrival_rate == pytest.approx(level2)
    assert f.trend == pytest.approx(trend2 / 0.5)  # per second, not per window
    assert f.predicted_rate == pytest.approx(level2 + trend2 / 0.5 * (0.25 + 1.0))


def test_steady_load_converges_to_its_rate_with_no_trend() -> None:
    p = Predictor()
    feed_steady(p, 20, 0.0, 40.0)
    f = p.forecast(40.0, backlog=0, horizon_s=1.0)
    assert f.arrival_rate == pytest.approx(20.0, abs=0.01)
    assert f.trend == pytest.approx(0.0, abs=0.01)
    assert f.predicted_rate == pytest.approx(20.0, abs=0.05)


def test_a_rising_load_is_forecast_ahead_of_its_level() -> None:
    p = Predictor()
    for second in range(20):  # 10, 12, 14, ... tasks/s: +2/s every second
        p.record_arrival(second + 0.5, "t", count=10 + 2 * second)
    f = p.forecast(20.0, backlog=0, horizon_s=2.0)
    assert f.trend == pytest.approx(2.0, rel=0.1)
    assert f.predicted_rate > f.arrival_rate
    # Two seconds on, the rate will be 52/s (the window [19, 20) had 48/s, measured at 19.5).
    assert f.predicted_rate == pytest.approx(53.0, rel=0.05)


def test_an_idle_period_decays_the_level_to_exactly_zero() -> None:
    p = Predictor()
    feed_steady(p, 50, 0.0, 10.0)
    busy = p.forecast(10.0, backlog=0, horizon_s=1.0).arrival_rate
    after_three = p.forecast(13.0, backlog=0, horizon_s=1.0)
    assert after_three.arrival_rate < busy / 4
    quiet = p.forecast(60.0, backlog=0, horizon_s=1.0)
    assert (quiet.arrival_rate, quiet.predicted_rate, quiet.trend) == (0.0, 0.0, 0.0)


def test_a_very_long_idle_period_is_skipped_not_replayed() -> None:
    p = Predictor(level_alpha=0.01, trend_beta=0.01)  # slow decay: many windows to close
    feed_steady(p, 100, 0.0, 5.0)
    # 1e12 windows: walking them one by one would never finish within the test timeout.
    f = p.forecast(1e12, backlog=0, horizon_s=1.0)
    assert f.arrival_rate == 0.0
    assert f.predicted_rate == 0.0


def test_a_late_arrival_is_counted_in_the_open_window() -> None:
    p = Predictor()
    p.forecast(5.2, backlog=0, horizon_s=0.0)  # window [5, 6) is open
    p.record_arrival(3.0, "t", count=4)  # stamped in a closed window
    assert p.forecast(6.0, backlog=0, horizon_s=0.0).arrival_rate == pytest.approx(2.0)


def test_service_time_is_an_ewma_of_each_windows_mean_runtime() -> None:
    p = Predictor(service_alpha=0.2)
    assert p.service_time("a") is None
    p.record_completion(0.1, "a", 0.1)
    assert p.service_time("a") == pytest.approx(0.1)  # before the window closes: its mean
    p.record_completion(1.2, "a", 0.2)
    p.record_completion(1.7, "a", 0.4)
    assert p.service_time("a") == pytest.approx(0.1)  # window [1, 2) still open
    p.forecast(2.0, backlog=0, horizon_s=0.0)
    assert p.service_time("a") == pytest.approx(0.2 * 0.3 + 0.8 * 0.1)
    assert p.service_time("b") is None


def test_the_forecast_service_time_is_weighted_by_the_recent_task_mix() -> None:
    p = Predictor()
    for second in range(10):
        p.record_arrival(second + 0.1, "short", count=9)
        p.record_arrival(second + 0.1, "long", count=1)
        p.record_completion(second + 0.5, "short", 0.01)
        p.record_completion(second + 0.5, "long", 0.1)
    f = p.forecast(10.0, backlog=0, horizon_s=1.0)
    assert f.service_time == pytest.approx(0.9 * 0.01 + 0.1 * 0.1)


def test_the_mix_follows_a_change_of_task_names() -> None:
    p = Predictor()
    for second in range(10):
        p.record_arrival(second + 0.1, "short", count=10)
        p.record_completion(second + 0.5, "short", 0.01)
        p.record_completion(second + 0.5, "long", 0.5)
    for second in range(10, 20):
        p.record_arrival(second + 0.1, "long", count=10)
    # After ten windows of only "long" arrivals the mix is ~all long.
    assert p.forecast(20.0, backlog=0, horizon_s=1.0).service_time == pytest.approx(0.5, rel=0.01)


def test_a_name_never_completed_is_costed_at_the_average_of_all_completions() -> None:
    p = Predictor(default_service_time=0.05)
    p.record_completion(0.5, "known", 0.3)
    p.forecast(1.0, backlog=0, horizon_s=0.0)
    p.record_arrival(1.5, "new", count=5)
    assert p.forecast(1.6, backlog=0, horizon_s=1.0).service_time == pytest.approx(0.3)


def test_the_forecast_is_frozen() -> None:
    f = Predictor().forecast(0.0, backlog=0, horizon_s=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.backlog = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("window_s", 0.0),
        ("window_s", -1.0),
        ("window_s", math.inf),
        ("level_alpha", 0.0),
        ("level_alpha", 1.5),
        ("level_alpha", math.nan),
        ("trend_beta", -0.1),
        ("trend_beta", 1.1),
        ("service_alpha", 0.0),
        ("default_service_time", 0.0),
        ("default_service_time", math.nan),
    ],
)
def test_bad_constructor_arguments_are_named(argument: str, value: float) -> None:
    with pytest.raises(ValueError, match=argument):
        Predictor(**{argument: value})


def test_trend_beta_zero_is_plain_exponential_smoothing() -> None:
    p = Predictor(trend_beta=0.0)
    for second in range(10):
        p.record_arrival(second + 0.5, "t", count=10 * (second + 1))
    f = p.forecast(10.0, backlog=0, horizon_s=5.0)
    assert f.trend == 0.0
    assert f.predicted_rate == f.arrival_rate


def test_bad_observations_are_named() -> None:
    p = Predictor()
    with pytest.raises(ValueError, match="count"):
        p.record_arrival(0.0, "t", count=-1)
    with pytest.raises(ValueError, match="runtime_s"):
        p.record_completion(0.0, "t", -0.1)
    with pytest.raises(ValueError, match="now"):
        p.record_arrival(math.nan, "t")
    with pytest.raises(ValueError, match="backlog"):
        p.forecast(0.0, backlog=-1, horizon_s=1.0)
    with pytest.raises(ValueError, match="horizon_s"):
        p.forecast(0.0, backlog=0, horizon_s=-1.0)


arrivals = st.lists(
    st.tuples(
        st.floats(0.0, 1.0, allow_nan=False),  # gap since the previous arrival
        st.integers(0, 50),
    ),
    max_size=60,
)


def replay(events: list[tuple[float, int]], end_gap: float) -> Forecast:
    p = Predictor(window_s=0.25)
    now = 0.0
    for gap, count in events:
        now += gap
        p.record_arrival(now, "t", count)
        p.record_completion(now, "t", gap)
    return p.forecast(now + end_gap, backlog=3, horizon_s=1.0)


@given(arrivals, st.floats(0.0, 30.0, allow_nan=False))
def test_forecasts_are_finite_non_negative_and_deterministic(
    events: list[tuple[float, int]], end_gap: float
) -> None:
    f = replay(events, end_gap)
    assert f == replay(events, end_gap)
    for value in (f.arrival_rate, f.predicted_rate, f.service_time):
        assert math.isfinite(value) and value >= 0
    assert math.isfinite(f.trend)


@given(st.integers(1, 200))
def test_a_constant_rate_is_learned_whatever_it_is(per_window: int) -> None:
    p = Predictor()
    for second in range(30):
        p.record_arrival(second + 0.5, "t", count=per_window)
    f = p.forecast(30.0, backlog=0, horizon_s=1.0)
    assert f.arrival_rate == pytest.approx(per_window, rel=1e-3)
    assert f.predicted_rate == pytest.approx(per_window, rel=1e-3)


# -- bursts and unknown service times ------------------------------------------------------
def test_poisson_tail_matches_the_pmf() -> None:
    from celery_adaptive.predictor import poisson_tail

    assert poisson_tail(0, 3.0) == 1.0
    assert poisson_tail(1, 0.0) == 0.0
    assert poisson_tail(1, 2.0) == pytest.approx(1 - math.exp(-2.0))
    assert poisson_tail(3, 2.0) == pytest.approx(1 - math.exp(-2.0) * (1 + 2.0 + 2.0))
    assert poisson_tail(3, 1000.0) == 1.0  # exp underflow: never reads as improbable


def test_a_burst_after_idle_is_seen_from_its_first_arrivals() -> None:
    p = Predictor()
    p.forecast(10.0, 0, 2.0)
    for t in (20.000, 20.010, 20.020, 20.030):
        p.record_arrival(t, "io")
    f = p.forecast(20.031, 0, 2.0)
    assert f.arrival_rate == 0.0  # the 1 s windows have not noticed yet
    assert f.burst_rate == pytest.approx(4 / 0.0625)  # span floored at a quarter lookback
    assert f.predicted_rate == f.burst_rate
    # Two arrivals are not a burst; a quarter of a second later the burst is over.
    assert p.forecast(20.5, 0, 2.0).burst_rate == 0.0


@pytest.mark.parametrize("rate", [10.0, 40.0, 200.0])
def test_a_steady_poisson_load_does_not_read_as_bursts(rate: float) -> None:
    # Checked at every arrival, as the pool does: a false burst grows the pool for nothing.
    import random

    rng = random.Random(7)
    p = Predictor()
    t, fired, checks = 0.0, 0, 0
    while t < 300.0:
        t += rng.expovariate(rate)
        p.record_arrival(t, "t")
        if t > 10.0:  # once the level has learned the rate
            checks += 1
            fired += p.forecast(t, 0, 2.0).burst_rate > 0
    assert checks > 2_500
    assert fired / checks < 0.0005


def test_a_jump_in_rate_is_seen_before_the_window_closes() -> None:
    p = Predictor()
    feed_steady(p, 10, 0.0, 20.0)
    feed_steady(p, 200, 20.0, 20.1)
    f = p.forecast(20.1, 0, 2.0)
    assert f.arrival_rate == pytest.approx(10.0, rel=0.05)
    assert f.burst_rate > 100.0


def test_an_unseen_name_is_costed_at_twice_its_longest_run_so_far() -> None:
    p = Predictor(default_service_time=0.05)
    p.record_arrival(1.0, "new")
    assert p.forecast(1.01, 0, 2.0, running={"new": 0.01}).service_time == 0.05
    assert p.forecast(1.2, 0, 2.0, running={"new": 0.15}).service_time == pytest.approx(0.3)
    p.record_completion(1.5, "new", 0.4)
    # Once it has finished, its runtimes decide; a running instance no longer does.
    assert p.forecast(1.6, 0, 2.0, running={"new": 0.9}).service_time == pytest.approx(0.4)


def test_the_broker_part_of_the_backlog_is_carried_and_checked() -> None:
    p = Predictor()
    assert p.forecast(1.0, 10, 2.0, broker_backlog=4).broker_backlog == 4
    with pytest.raises(ValueError, match="broker_backlog"):
        p.forecast(1.0, 3, 2.0, broker_backlog=4)


def test_the_end_of_a_burst_is_seen_from_its_silence() -> None:
    # After 32 arrivals in half a second, Holt's level decays over several seconds; a silence
    # improbable for it (and at least a window long) means the load has stopped.
    p = Predictor()
    for i in range(32):
        p.record_arrival(10.0 + i / 64, "io")
    assert p.forecast(10.6, 0, 2.0).quiet_s == 0.0  # shorter than a window
    f = p.forecast(11.7, 0, 2.0)
    assert f.arrival_rate > 5.0  # the level still remembers the burst
    assert f.quiet_s == pytest.approx(11.7 - (10.0 + 31 / 64))
    assert f.predicted_rate == 0.0 and f.current_rate == 0.0
    p.record_arrival(11.8, "io")  # any arrival ends the silence
    assert p.forecast(11.8, 0, 2.0).quiet_s == 0.0


@pytest.mark.parametrize("rate", [5.0, 40.0])
def test_a_steady_poisson_load_is_never_read_as_stopped(rate: float) -> None:
    import random

    rng = random.Random(11)
    p = Predictor()
    t, quiet = 0.0, 0
    while t < 300.0:
        gap = rng.expovariate(rate)
        # Check in the middle of every gap too, where a silence is longest so far.
        if t > 10.0:
            quiet += p.forecast(t + gap * 0.99, 0, 2.0).quiet_s > 0
        t += gap
        p.record_arrival(t, "t")
    assert quiet == 0
