"""What load is coming: arrival rate, service time and backlog, as numbers.

Data flow::

    record_arrival(now, name) ──► open window count ──(window closes)──► Holt level + trend
                             │           └──────────────────────────────► task-mix weights
                             └──► recent arrival times ──► burst rate (when improbably high)
    record_completion(now, name, runtime) ──► open window runtimes ──(window closes)──► per-name EWMA
    forecast(now, backlog, horizon) ──► Forecast(rate now, rate at now+horizon, mean service time)

The predictor is pure: the caller passes every observation and the current time in, and nothing
here reads a clock, sleeps or does I/O. Time is only used to decide which window an arrival
belongs to, so a simulation that passes simulated seconds gets exactly what the pool would.

Holt's level moves only when a window closes, so at the start of a burst it lags by up to a
window. The burst rate closes that gap: when more arrivals came in the last
``burst_lookback_s`` than the forecast makes plausible (a one-sided Poisson test at
``burst_significance``), the rate they imply stands in for the forecast until the windows catch
up. Ordinary Poisson clumping at a steady rate does not pass the test.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Forecast", "Predictor", "poisson_tail"]

# Hours of idleness are closed window by window; past this many empty windows whatever is left
# of level, trend and task mix is below any meaningful rate, so it is dropped in one step.
_MAX_EMPTY_WINDOWS = 10_000
# Below this, a rate (tasks/s) or a mix weight is float dust left by geometric decay.
_NEGLIGIBLE = 1e-9


@dataclass(frozen=True)
class Forecast:
    """The predictor's view of load at one instant, in the units the controller needs."""

    at: float
    arrival_rate: float
    """Tasks/s now: the smoothed level over closed windows."""
    predicted_rate: float
    """Tasks/s expected ``horizon_s`` from now, never negative.

    level + trend * (age + horizon), where age is how long ago the middle of the last closed
    window was: the level measures the rate there, not now."""
    trend: float
    """Change of the arrival rate, in tasks/s per second."""
    service_time: float
    """Mean seconds per task over the recent task mix."""
    backlog: int
    """Tasks waiting: queued in the pool plus the broker's queue, as told by the caller."""
    horizon_s: float
    broker_backlog: int = 0
    """Of ``backlog``, the tasks still in the broker: the pool has not even prefetched them, so
    its prefetch (capacity x multiplier) is full and they wait for capacity that is missing."""
    oldest_wait_s: float = 0.0
    """How long the longest-waiting task in the pool's queue has waited so far."""
    burst_rate: float = 0.0
    """Tasks/s implied by the last moments' arrivals when they are improbably many for the
    smoothed forecast (a burst has begun), else 0. ``predicted_rate`` is at least this."""
    current_rate: float = 0.0
    """Tasks/s now: the level moved by the trend to this instant (not ``horizon_s`` ahead)."""
    quiet_s: float = 0.0
    """Seconds since the last arrival when that silence is improbably long for the smoothed
    forecast (the load has stopped), else 0. ``predicted_rate`` is then 0."""


def poisson_tail(k: int, mean: float) -> float:
    """P(X >= k) for X ~ Poisson(mean): 1 minus the sum of the first k terms of the pmf."""
    if k <= 0:
        return 1.0
    if mean <= 0:
        return 0.0
    term = math.exp(-mean)
    below = term
    for i in range(1, k):
        term *= mean / i
        below += term
    return max(0.0, 1.0 - below)


def _check_unit_interval(name: str, value: float, *, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):  # also rejects NaN
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"invalid {name}={value!r}: must be in {bound}")


def _check_positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"invalid {name}={value!r}: must be a finite number > 0")


def _check_time(now: float) -> None:
    if not math.isfinite(now):
        raise ValueError(f"invalid now={now!r}: must be a finite time")


class Predictor:
    """Forecasts arrival rate (Holt's double exponential smoothing) and service time (EWMA).

    Arrivals are counted in fixed windows aligned to multiples of ``window_s``; a window counts
    once it has closed, so a half-filled window never reads as a drop in load. Windows with no
    arrivals are closed as zeros, which is what lets the level decay to 0 when the queue goes
    quiet. The trend is what makes this predictive: on a ramp, ``predicted_rate`` runs ahead of
    the level by trend * horizon, so capacity started now is ready when the load gets there.
    """

    def __init__(
        self,
        *,
        window_s: float = 1.0,
        level_alpha: float = 0.5,
        trend_beta: float = 0.3,
        service_alpha: float = 0.2,
        default_service_time: float = 0.05,
        burst_lookback_s: float = 0.25,
        burst_min_arrivals: int = 3,
        # The test runs at every arrival, over overlapping lookbacks (a scan): at 1e-3 a steady
        # Poisson load at 10-40/s read as a burst 2-3.5 times a minute, at 1e-5 never in 290 s,
        # while a burst after idle is still seen at its third arrival.
        burst_significance: float = 1e-5,
        burst_memory: int = 64,
    ) -> None:
        _check_positive("window_s", window_s)
        _check_positive("burst_lookback_s", burst_lookback_s)
        _check_unit_interval("burst_significance", burst_significance)
        if burst_min_arrivals < 1 or burst_memory < burst_min_arrivals:
            raise ValueError(
                f"invalid burst_min_arrivals={burst_min_arrivals!r}, burst_memory={burst_memory!r}:"
                " need 1 <= burst_min_arrivals <= burst_memory"
            )
        _check_unit_interval("level_alpha", level_alpha)
        # beta = 0 is plain exponential smoothing (no trend); that is a legitimate choice.
        _check_unit_interval("trend_beta", trend_beta, allow_zero=True)
        _check_unit_interval("service_alpha", service_alpha)
        _check_positive("default_service_time", default_service_time)
        self.window_s = window_s
        self.level_alpha = level_alpha
        self.trend_beta = trend_beta
        self.service_alpha = service_alpha
        self.default_service_time = default_service_time
        self.burst_lookback_s = burst_lookback_s
        self.burst_min_arrivals = burst_min_arrivals
        self.burst_significance = burst_significance
        # Times of the latest arrivals (one entry per task), for the burst test.
        self._recent: deque[float] = deque(maxlen=burst_memory)
        # A pool starts with no known load; starting the level at 0 makes the first busy window
        # an ordinary step up, which the trend then sees.
        self._level = 0.0
        self._trend = 0.0  # tasks/s per window
        self._window: int | None = None  # index of the open window
        self._window_count = 0
        self._window_names: dict[str, int] = {}
        self._mix: dict[str, float] = {}  # smoothed arrivals per window, by task name
        self._service: dict[str, float] = {}
        self._service_all: float | None = None  # EWMA over every completion, any name
        # Runtimes of the open window, by name: (sum, count). Averaging a window's runtimes
        # before smoothing keeps one long task from swinging the estimate at high throughput,
        # while a name that completes once per window is smoothed per completion.
        self._runtimes: dict[str, tuple[float, int]] = {}

    # -- observations -------------------------------------------------------------------------

    def record_arrival(self, now: float, task_name: str, count: int = 1) -> None:
        """Count ``count`` tasks named ``task_name`` arriving at ``now``.

        An arrival stamped before the open window (a late report) is counted in the open window:
        closed windows are already folded into the level and cannot be rewritten.
        """
        _check_time(now)
        if count < 0:
            raise ValueError(f"invalid count={count!r}: must be >= 0")
        self._advance(now)
        self._window_count += count
        self._window_names[task_name] = self._window_names.get(task_name, 0) + count
        self._recent.extend([now] * min(count, self._recent.maxlen or 0))

    def record_completion(self, now: float, task_name: str, runtime_s: float) -> None:
        """Count one finished task's runtime towards its name's service time.

        The runtimes of a window are averaged, and the average is folded into the name's EWMA
        (weight ``service_alpha``) when the window closes.
        """
        _check_time(now)
        if not (runtime_s >= 0 and math.isfinite(runtime_s)):
            raise ValueError(f"invalid runtime_s={runtime_s!r}: must be a finite number >= 0")
        self._advance(now)
        total, count = self._runtimes.get(task_name, (0.0, 0))
        self._runtimes[task_name] = (total + runtime_s, count + 1)

    def service_time(self, task_name: str) -> float | None:
        """Smoothed runtime of ``task_name``, or None before its first completion.

        Until the first window with a completion closes, the open window's mean stands in, so a
        new task name is costed from its own runtimes as soon as one has finished.
        """
        smoothed = self._service.get(task_name)
        if smoothed is not None:
            return smoothed
        total, count = self._runtimes.get(task_name, (0.0, 0))
        return total / count if count else None

    # -- forecast -----------------------------------------------------------------------------

    def forecast(
        self,
        now: float,
        backlog: int,
        horizon_s: float,
        running: Mapping[str, float] | None = None,
        broker_backlog: int = 0,
        oldest_wait_s: float = 0.0,
    ) -> Forecast:
        """Close the windows that ended by ``now`` and report load, and load ``horizon_s`` ahead.

        ``running`` maps task names to how long their longest running instance has run so far:
        a name never seen completing is then costed at twice that (it has taken that long
        already, and is as likely past half-way as not), rather than at the default guess
        until its first completion.
        """
        _check_time(now)
        if backlog < 0:
            raise ValueError(f"invalid backlog={backlog!r}: must be >= 0")
        if not 0 <= broker_backlog <= backlog:
            raise ValueError(f"invalid broker_backlog={broker_backlog!r}: must be in [0, backlog]")
        if not (horizon_s >= 0 and math.isfinite(horizon_s)):
            raise ValueError(f"invalid horizon_s={horizon_s!r}: must be a finite number >= 0")
        self._advance(now)
        trend_per_s = self._trend / self.window_s
        assert self._window is not None
        # A window's count measures the rate at its middle, so the level is already this old.
        age = now - (self._window * self.window_s - self.window_s / 2)
        rate_now = max(0.0, self._level + trend_per_s * age)
        burst = self._burst_rate(now, rate_now)
        predicted = max(burst, self._level + trend_per_s * (age + horizon_s))
        quiet = self._quiet_for(now, rate_now)
        return Forecast(
            at=now,
            arrival_rate=self._level,
            predicted_rate=0.0 if quiet else predicted,
            current_rate=0.0 if quiet else rate_now,
            quiet_s=quiet,
            trend=trend_per_s,
            service_time=self._mix_service_time(running or {}),
            backlog=backlog,
            horizon_s=horizon_s,
            burst_rate=burst,
            broker_backlog=broker_backlog,
            oldest_wait_s=max(0.0, oldest_wait_s),
        )

    def _burst_rate(self, now: float, expected_rate: float) -> float:
        """The rate of the last ``burst_lookback_s`` if it is improbably high, else 0.

        ``k`` arrivals in the lookback, where the forecast expects ``m = rate * lookback``:
        a burst when P(X >= k | Poisson(m)) < ``burst_significance``. The rate is ``k`` over the
        time since the oldest of them (at least a quarter of the lookback, so three arrivals
        a millisecond apart do not read as thousands per second).
        """
        start = now - self.burst_lookback_s
        recent = [t for t in self._recent if start < t <= now]
        k = len(recent)
        if k < self.burst_min_arrivals:
            return 0.0
        if poisson_tail(k, expected_rate * self.burst_lookback_s) >= self.burst_significance:
            return 0.0
        span = max(now - recent[0], self.burst_lookback_s / 4)
        return k / span

    def _quiet_for(self, now: float, expected_rate: float) -> float:
        """Seconds since the last arrival if none in that time is improbable, else 0.

        The mirror of the burst test: the level lags a burst's end as it lags its start (a
        second's window of 30 arrivals decays over several seconds), and children kept for load
        that has stopped are paid for in idle process-seconds. No arrival for ``q`` seconds has
        probability exp(-rate * q) under the forecast; below ``burst_significance``, and at least
        a window long, the load has stopped. A steady Poisson load leaves such a gap about once
        per 1/significance arrivals, and the scale-down window absorbs a stray one.
        """
        if not self._recent or expected_rate <= 0.0:
            return 0.0
        silent = now - self._recent[-1]
        # At least a whole window: arrivals that come in batches (a beat schedule, a producer
        # that flushes) leave gaps within a window that its count already averages over.
        if silent < self.window_s or expected_rate * silent < -math.log(self.burst_significance):
            return 0.0
        return silent

    # -- internals ----------------------------------------------------------------------------

    def _ewma(self, previous: float | None, sample: float) -> float:
        if previous is None:
            return sample
        return self.service_alpha * sample + (1.0 - self.service_alpha) * previous

    def _advance(self, now: float) -> None:
        index = math.floor(now / self.window_s)
        if self._window is None:
            self._window = index
            return
        closed = 0
        while self._window < index:
            self._close_window()
            self._window += 1
            closed += 1
            idle = self._level == 0.0 and self._trend == 0.0 and not self._mix
            if idle or closed >= _MAX_EMPTY_WINDOWS:
                # Nothing left to decay (or nothing that matters): skip the remaining empty
                # windows at once, so a pool idle for a day costs no more than one idle second.
                self._level, self._trend = 0.0, 0.0
                self._mix.clear()
                self._window = index

    def _close_window(self) -> None:
        alpha, beta = self.level_alpha, self.trend_beta
        rate = self._window_count / self.window_s
        previous = self._level
        # Holt: the level chases the observation from where the trend said it would be; a rate
        # cannot be negative, so a steep fall is floored at 0 rather than predicting "anti-load".
        self._level = max(0.0, alpha * rate + (1.0 - alpha) * (previous + self._trend))
        self._trend = beta * (self._level - previous) + (1.0 - beta) * self._trend
        if self._level < _NEGLIGIBLE and self._trend < _NEGLIGIBLE:
            # At the floor a falling trend means nothing, and if kept it would hold the forecast
            # down when load comes back.
            self._level, self._trend = 0.0, 0.0
        # The task mix is smoothed with the same alpha as the level, so "recent" means the same
        # thing for how many tasks come as for which tasks come.
        for name in list(self._mix):
            weight = (1.0 - alpha) * self._mix[name]
            if weight < _NEGLIGIBLE:
                del self._mix[name]
            else:
                self._mix[name] = weight
        for name, count in self._window_names.items():
            if count:
                self._mix[name] = self._mix.get(name, 0.0) + alpha * count
        self._window_count = 0
        self._window_names = {}
        if self._runtimes:
            for name, (total, count) in self._runtimes.items():
                self._service[name] = self._ewma(self._service.get(name), total / count)
            every = sum(t for t, _ in self._runtimes.values())
            finished = sum(c for _, c in self._runtimes.values())
            self._service_all = self._ewma(self._service_all, every / finished)
            self._runtimes = {}

    def _mix_service_time(self, running: Mapping[str, float]) -> float:
        fallback = self._service_all
        if fallback is None and self._runtimes:
            every = sum(t for t, _ in self._runtimes.values())
            fallback = every / sum(c for _, c in self._runtimes.values())
        if fallback is None:
            fallback = self.default_service_time
        # The open window counts too: a task name that just started arriving should weigh in
        # before its first full window closes.
        weights = dict(self._mix)
        for name, count in self._window_names.items():
            weights[name] = weights.get(name, 0.0) + self.level_alpha * count
        total = sum(weights.values())
        if total <= 0.0:
            return fallback
        # A name never seen completing is costed at the average over all completions: a
        # guess, but one drawn from this workload rather than from a constant.
        weighted = 0.0
        for name, weight in weights.items():
            known = self.service_time(name)
            if known is None:
                # Never seen finishing, but running for ``age``: half-way through is the median
                # guess when nothing else is known (Gott's delta-t argument), so 2 x age.
                known = max(fallback, 2.0 * running.get(name, 0.0))
            weighted += weight * known
        return weighted / total
