"""How many children to run: a Forecast and the current size in, a ScalingDecision out.

Data flow::

    Forecast(predicted_rate λ, service_time S, backlog Q)
        └─► children_needed: smallest c with Erlang-C wait <= target, for λ_eff = λ + Q/D
              ├─► at least ceil(λ_now·S / max_utilization) while load lasts (utilization_floor)
              └─► desired = clamp(needed, min_children, max_children)
                    ├─► up:   desired > current        -> at once, at most max_step_up more
                    ├─► down: max(desired over the last stabilization_s) < current
                    │                                  -> at most max_step_down fewer
                    └─► hold: otherwise

The sizing formula (M/M/c with a backlog term):

* The pool is modelled as M/M/c: Poisson arrivals at λ = ``forecast.predicted_rate``, mean
  service time S = ``forecast.service_time``, c children, offered load a = λ·S. The expected
  wait in the queue is Erlang C: ``Wq(c) = C(c, a) · S / (c − a)`` for c > a, else infinite.
* The backlog Q (pool queue + broker queue) is work that is already late, so it is treated as
  extra arrivals to be cleared within the drain horizon D = ``drain_s`` (default 1 s, one
  control interval): ``λ_eff = λ + Q / D``. A burst that already queued 100 tasks of 50 ms asks
  for about 100·0.05/D = 5 more children; a healthy pool's queue holds λ·Wq tasks, a small
  fraction of λ·W, so it adds little. Counting the whole queue (not only what exceeds λ·W) is
  what lets the first ticks of a burst, while the rate forecast still lags, size for it.
* Of the backlog, what is still in the broker (the pool's prefetch, capacity x multiplier, is
  full, so these tasks wait for capacity that does not exist yet) is cleared within the target
  wait instead: ``λ_eff = λ + Q_pool / D + Q_broker / W``. In a healthy pool the prefetch absorbs
  the queue and the broker part is 0, so a steady load's momentary queues never trigger it.
  The same holds for the whole backlog once its oldest task has waited half the target: the
  queue is then not a clump the next interval absorbs (a stall, a hiccup of the host) and the
  pool grows to catch up within the target.
* ``needed`` is the smallest c with ``Wq(c; λ_eff, S) <= W`` (W = ``target_wait_s``); 0 when
  there is no load at all.
* And at least enough children to keep each at most ``max_utilization`` busy at the rate now
  (``Forecast.current_rate``): the mean wait is a weak guide to the tail (one child 70% busy
  with 10 ms tasks meets a 200 ms mean wait while its slowest 1% wait ~100 ms), and the model
  misses clumps and the CPU contention of a busy host. Not when the load has stopped
  (``Forecast.quiet_s``).

Scale-down follows Kubernetes' HPA: the controller remembers each desired size for
``stabilization_s`` and shrinks only to the largest of them, so the pool gets smaller only after
demand has been lower for the whole window, and a single quiet second never undoes a burst.
Nothing here reads a clock: ``now`` is passed in by the caller.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

from celery_adaptive.predictor import Forecast

__all__ = [
    "CAUSES",
    "Controller",
    "Direction",
    "ScalingDecision",
    "children_needed",
    "erlang_c_wait",
    "utilization_floor",
]

Direction = Literal["up", "down", "hold"]

#: A queue whose oldest task has waited this fraction of the target wait is cleared urgently.
LATE_FRACTION = 0.5

#: Why a decision went the way it did, in a word (a bounded set, for metric labels; the
#: sentence with the numbers is ``ScalingDecision.reason``).
CAUSES = (
    "below_minimum",  # up to the minimum
    "above_maximum",  # down to the maximum
    "late_queue",  # up: the oldest queued task has waited half the target wait
    "utilization",  # up: the utilization ceiling asks for more than the wait target
    "forecast",  # up: the forecast and backlog need more children for the wait target
    "lower_demand",  # down: demand stayed lower for the stabilization window
    "load_stopped",  # down: no arrival for an improbably long time
    "stabilizing",  # hold: lower demand, not yet for the whole window
    "steady",  # hold: the pool has what the forecast needs
    "bounds",  # a resize ordered by new bounds (the autoscale command)
)


@dataclass(frozen=True)
class ScalingDecision:
    """One controller decision: what to do with the pool, and why, in a sentence."""

    at: float
    current: int
    """Children the caller had (starting, idle or busy; not draining)."""
    desired: int
    """What this forecast alone asks for, within [min_children, max_children]."""
    target: int
    """What the pool should have now, after step limits and scale-down stabilization."""
    direction: Direction
    reason: str
    cause: str = "steady"
    """One of `CAUSES`."""


def _check_rate_and_time(arrival_rate: float, service_time: float) -> None:
    if not (arrival_rate >= 0 and math.isfinite(arrival_rate)):
        raise ValueError(f"invalid arrival_rate={arrival_rate!r}: must be a finite number >= 0")
    if not (service_time >= 0 and math.isfinite(service_time)):
        raise ValueError(f"invalid service_time={service_time!r}: must be a finite number >= 0")


def erlang_c_wait(servers: int, arrival_rate: float, service_time: float) -> float:
    """Expected seconds a task waits in the queue of an M/M/c system (inf when unstable).

    Erlang B is computed by its recurrence ``B(k) = a·B(k−1) / (k + a·B(k−1))``, which never
    forms a^c or c! and so stays finite for thousands of servers; Erlang C follows from it.
    """
    if servers < 0:
        raise ValueError(f"invalid servers={servers!r}: must be >= 0")
    _check_rate_and_time(arrival_rate, service_time)
    if arrival_rate == 0:
        return 0.0
    load = arrival_rate * service_time
    if servers == 0 or load >= servers:
        return math.inf
    blocking = 1.0
    for k in range(1, servers + 1):
        blocking = load * blocking / (k + load * blocking)
    return _wait_from_blocking(servers, load, blocking, service_time)


def _wait_from_blocking(servers: int, load: float, blocking: float, service_time: float) -> float:
    waiting = servers * blocking / (servers - load * (1.0 - blocking))  # Erlang C
    return waiting * service_time / (servers - load)


def children_needed(
    arrival_rate: float,
    service_time: float,
    target_wait_s: float,
    *,
    backlog: int = 0,
    drain_s: float = 1.0,
    limit: int | None = None,
    urgent_backlog: int = 0,
) -> int:
    """Smallest number of children whose M/M/c queue wait is <= ``target_wait_s``.

    The backlog counts as extra arrivals over ``drain_s`` seconds, the urgent backlog as extra
    arrivals over ``target_wait_s`` (see the module docstring). With ``limit``, the search stops there and
    returns ``limit``: a caller that clamps to a maximum need not pay to learn how far beyond it
    the need goes.
    """
    _check_rate_and_time(arrival_rate, service_time)
    if not (target_wait_s > 0 and math.isfinite(target_wait_s)):
        raise ValueError(f"invalid target_wait_s={target_wait_s!r}: must be a finite number > 0")
    if backlog < 0 or urgent_backlog < 0:
        raise ValueError(f"invalid backlog={backlog!r}/{urgent_backlog!r}: must be >= 0")
    if not (drain_s > 0 and math.isfinite(drain_s)):
        raise ValueError(f"invalid drain_s={drain_s!r}: must be a finite number > 0")
    if limit is not None and limit < 0:
        raise ValueError(f"invalid limit={limit!r}: must be >= 0")
    rate = arrival_rate + backlog / drain_s + urgent_backlog / target_wait_s
    if rate == 0:
        return 0
    load = rate * service_time
    # One pass of the Erlang B recurrence serves every candidate c, so the search is O(c).
    blocking = 1.0
    servers = 0
    while limit is None or servers < limit:
        servers += 1
        blocking = load * blocking / (servers + load * blocking)
        if servers > load and _wait_from_blocking(servers, load, blocking, service_time) <= (
            target_wait_s
        ):
            return servers
    return servers


def _check_utilization(max_utilization: float) -> None:
    if not 0 < max_utilization <= 1:  # also refuses NaN
        raise ValueError(f"invalid max_utilization={max_utilization!r}: must be in (0, 1]")


def utilization_floor(arrival_rate: float, service_time: float, max_utilization: float) -> int:
    """Fewest children that keep each at most ``max_utilization`` busy (0 with no load)."""
    _check_rate_and_time(arrival_rate, service_time)
    _check_utilization(max_utilization)
    return max(0, math.ceil(arrival_rate * service_time / max_utilization - 1e-9))


def _check_bounds(min_children: int, max_children: int) -> None:
    if min_children < 1:
        raise ValueError(f"invalid min_children={min_children!r}: must be >= 1")
    if max_children < min_children:
        raise ValueError(
            f"invalid max_children={max_children!r}: must be >= min_children={min_children}"
        )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


class Controller:
    """Turns forecasts into pool sizes: up at once, down slowly, always within bounds.

    The caller applies ``decision.target`` (starting children, or draining the surplus so no
    task is dropped) and passes the resulting size back as ``current`` next time.
    """

    def __init__(
        self,
        *,
        min_children: int,
        max_children: int,
        target_wait_s: float = 0.2,
        stabilization_s: float = 30.0,
        max_step_up: int | None = None,
        max_step_down: int = 1,
        step_down_share: float | None = None,
        drain_s: float = 1.0,
        max_utilization: float = 1.0,
    ) -> None:
        _check_bounds(min_children, max_children)
        if not (target_wait_s > 0 and math.isfinite(target_wait_s)):
            raise ValueError(
                f"invalid target_wait_s={target_wait_s!r}: must be a finite number > 0"
            )
        if not (stabilization_s >= 0 and math.isfinite(stabilization_s)):
            raise ValueError(
                f"invalid stabilization_s={stabilization_s!r}: must be a finite number >= 0"
            )
        if max_step_up is not None and max_step_up < 1:
            raise ValueError(f"invalid max_step_up={max_step_up!r}: must be >= 1 or None")
        if max_step_down < 1:
            raise ValueError(f"invalid max_step_down={max_step_down!r}: must be >= 1")
        if not (drain_s > 0 and math.isfinite(drain_s)):
            raise ValueError(f"invalid drain_s={drain_s!r}: must be a finite number > 0")
        self.min_children = min_children
        self.max_children = max_children
        self.target_wait_s = target_wait_s
        self.stabilization_s = stabilization_s
        self.max_step_up = max_step_up
        if step_down_share is not None and not 0 < step_down_share <= 1:
            raise ValueError(f"invalid step_down_share={step_down_share!r}: must be in (0, 1]")
        self.max_step_down = max_step_down
        # With a share, the step follows the maximum (set_bounds may change it at run time).
        self.step_down_share = step_down_share
        _check_utilization(max_utilization)
        self.drain_s = drain_s
        self.max_utilization = max_utilization
        # Desired sizes of the stabilization window as a monotonic deque (values strictly
        # decreasing from the left), so the window's maximum is always the leftmost entry.
        self._window: deque[tuple[float, int]] = deque()
        self._first_at: float | None = None
        self._last_at: float | None = None

    def set_bounds(self, min_children: int, max_children: int) -> None:
        """Change the bounds (``--autoscale``, remote control); the next decision obeys them."""
        _check_bounds(min_children, max_children)
        self.min_children = min_children
        self.max_children = max_children

    def decide(self, now: float, forecast: Forecast, current: int) -> ScalingDecision:
        """Decide the pool size for ``now`` given the forecast and ``current`` children."""
        if not math.isfinite(now):
            raise ValueError(f"invalid now={now!r}: must be a finite time")
        if self._last_at is not None and now < self._last_at:
            # One loop on one monotonic clock makes the decisions; going back is a caller bug.
            raise ValueError(f"invalid now={now!r}: earlier than the last decision {self._last_at}")
        if current < 0:
            raise ValueError(f"invalid current={current!r}: must be >= 0")
        self._last_at = now
        if self._first_at is None:
            self._first_at = now

        low, high = self.min_children, self.max_children
        # A queued task has already used half of the target wait: the queue is not a momentary
        # clump that a control interval will absorb, so all of it is cleared within the target.
        late = forecast.oldest_wait_s >= self.target_wait_s * LATE_FRACTION
        needed = children_needed(
            forecast.predicted_rate,
            forecast.service_time,
            self.target_wait_s,
            backlog=0 if late else forecast.backlog - forecast.broker_backlog,
            drain_s=self.drain_s,
            urgent_backlog=forecast.backlog if late else forecast.broker_backlog,
            limit=high + 1,
        )
        busy = self._busy_floor(forecast)
        busy_bound = busy > needed
        needed = max(needed, busy)
        desired = min(max(needed, low), high)
        peak = self._remember(now, desired)
        why = self._explain(forecast, needed, busy_bound)

        def decision(target: int, direction: Direction, reason: str, cause: str) -> ScalingDecision:
            return ScalingDecision(now, current, desired, target, direction, reason, cause)

        # Bounds are orders, not forecasts: they apply at once and ignore step limits.
        if current > high:
            return decision(
                high, "down", f"down {current}->{high}: above the maximum {high}; {why}", "above_maximum"
            )
        if desired > current:
            step = desired - current if self.max_step_up is None else self.max_step_up
            target = max(low, min(desired, current + step))
            if current < low:
                note = f" (below the minimum {low})"
            elif target < desired:
                note = f" (step limited to +{step})"
            else:
                note = ""
            if current < low:
                cause = "below_minimum"
            elif late:
                cause = "late_queue"
            elif busy_bound:
                cause = "utilization"
            else:
                cause = "forecast"
            return decision(target, "up", f"up {current}->{target}{note}: {why}", cause)

        stabilized = min(peak, high)
        waited = now - self._first_at >= self.stabilization_s
        if stabilized < current and waited:
            target = max(stabilized, current - self._step_down())
            return decision(
                target,
                "down",
                f"down {current}->{target}: demand stayed at or below {stabilized} children "
                f"for {self.stabilization_s:g} s; {why}",
                "load_stopped" if forecast.quiet_s else "lower_demand",
            )
        if stabilized < current:
            return decision(
                current,
                "hold",
                f"hold {current}: {why}; shrinking only after {self.stabilization_s:g} s of "
                f"lower demand",
                "stabilizing",
            )
        if desired < current:
            return decision(
                current,
                "hold",
                f"hold {current}: {why}; {stabilized} were needed within the last "
                f"{self.stabilization_s:g} s",
                "stabilizing",
            )
        return decision(current, "hold", f"hold {current}: {why}", "steady")

    def _step_down(self) -> int:
        if self.step_down_share is None:
            return self.max_step_down
        return max(1, int(self.max_children * self.step_down_share))

    def _remember(self, now: float, desired: int) -> int:
        """Add this desired size to the window and return the window's maximum."""
        while self._window and self._window[-1][1] <= desired:
            self._window.pop()
        self._window.append((now, desired))
        # A desire exactly stabilization_s old has been superseded for the whole window. The
        # newest entry always stays: with no window, the current desire alone decides.
        while len(self._window) > 1 and now - self._window[0][0] >= self.stabilization_s:
            self._window.popleft()
        return self._window[0][1]

    def _busy_floor(self, forecast: Forecast) -> int:
        """Children that keep each one at most ``max_utilization`` busy at the measured rate.

        Erlang C sizes for the mean wait, and a pool of one child busy 70% of the time meets a
        200 ms mean wait with 10 ms tasks while its slowest 1% wait ~100 ms: the queueing model
        misses clumps and the CPU contention of a busy host. The rate now sets the floor (not
        the forecast a horizon ahead, whose trend overshoot this would double); once the load
        has stopped (``quiet_s``) there is none.
        """
        if forecast.quiet_s:
            return 0
        return utilization_floor(forecast.current_rate, forecast.service_time, self.max_utilization)

    def _explain(self, forecast: Forecast, needed: int, busy_bound: bool = False) -> str:
        load = (
            f"forecast {forecast.predicted_rate:.1f}/s x {_ms(forecast.service_time)}"
            f" with backlog {forecast.backlog}"
            + (f" ({forecast.broker_backlog} in the broker)" if forecast.broker_backlog else "")
            + (f", oldest waiting {_ms(forecast.oldest_wait_s)}"
               if forecast.oldest_wait_s >= self.target_wait_s * LATE_FRACTION else "")
            + (f", no arrival for {_ms(forecast.quiet_s)} (load stopped)" if forecast.quiet_s else "")
        )
        wait = f"wait <= {_ms(self.target_wait_s)}"
        if needed > self.max_children:
            return f"{load} needs more than the maximum {self.max_children} children for {wait}"
        if needed < self.min_children:
            return f"{load} needs {needed}, kept at the minimum {self.min_children}"
        if busy_bound:
            return (f"{load} needs {needed} children to keep each under "
                    f"{self.max_utilization:.0%} busy at {forecast.current_rate:.1f}/s")
        return f"{load} needs {needed} children for {wait}"
