"""The predictive autoscaler's glue: feeds the pure predictor and controller, applies decisions.

Data flow (every ``adaptive_control_interval`` seconds, on the event-loop thread)::

    arrivals (Pool.on_apply) ─┐
    completions (job hook)  ──┼─> Predictor ─> Forecast ─> Controller ─> ScalingDecision
    backlog: pool queue + broker queue (BacklogProbe thread) ─┘                 │
                                  Pool.resize_to(target): start children, or drain the surplus,
                                  and move the consumer's prefetch with capacity

Celery's own ``--autoscale`` machinery is kept as the control surface (the ``autoscale`` remote
command and Flower's button call ``worker.autoscaler.update``) but its reactive
``maybe_scale`` is switched off: `CeleryAutoscalerBridge` routes the bounds here instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

from celery.worker.autoscale import Autoscaler

from celery_adaptive.controller import Controller, ScalingDecision
from celery_adaptive.predictor import Forecast, Predictor
from celery_adaptive.settings import PoolSettings

logger = logging.getLogger("celery_adaptive.autoscaler")

#: An idle pool at its minimum decides this many times less often (see `next_tick_in`).
IDLE_TICK_FACTOR = 5

#: Decisions triggered by arrivals or a broker backlog are at least this far apart (seconds).
EARLY_DECISION_GAP_S = 0.01


class BacklogProbe:
    """Reads the broker's queue lengths off the event loop, on its own connection.

    A passive ``queue_declare`` answers with the message count on AMQP, and kombu's Redis
    transport answers it with the list's length, so one call covers both.
    """

    def __init__(self, app: Any, queues: list[str], interval: float,
                 busy: Any = None, idle_interval: float = 2.0,
                 saturated: Callable[[], bool] = lambda: False, saturated_interval: float = 0.05,
                 on_backlog: Callable[[int], object] = lambda value: None) -> None:
        self.app = app
        self.queues = queues
        self.interval = interval
        # While the pool has nothing to do, look less often: an idle worker should cost ~nothing.
        self.busy = busy or (lambda: True)
        self.idle_interval = max(idle_interval, interval)
        # While tasks wait inside the pool, its prefetch is full and new arrivals stay in the
        # broker, unseen by the pool: then this reading is the only way to see a burst grow.
        self.saturated = saturated
        self.saturated_interval = min(saturated_interval, interval)
        self.on_backlog = on_backlog
        self.value: int | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._channel: Any = None

    def start(self) -> None:
        if not self.queues or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="adaptive-backlog", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Work arrived: read the broker now rather than at the idle interval."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def _length(self, conn: Any, name: str) -> int:
        from amqp.exceptions import NotFound
        from kombu.exceptions import ChannelError

        if self._channel is None:
            self._channel = conn.channel()
        try:
            return int(self._channel.queue_declare(queue=name, passive=True).message_count)
        except (NotFound, ChannelError) as exc:
            # Redis has no key for an empty queue and says 404 for it: that is zero. (AMQP
            # closes the channel on a 404, so a fresh one is opened next time.)
            if isinstance(exc, NotFound):
                self._close_channel()
                return 0
            if "404" in str(exc):
                return 0
            raise

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                channel.close()
            except Exception:
                pass

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self.app.connection_for_read()
                    conn.ensure_connection(max_retries=1)
                self.value = sum(self._length(conn, name) for name in self.queues)
                if self.value:
                    self.on_backlog(self.value)
                if self._failing:
                    logger.info("Broker queue length readable again")
                self._failing = False
            except Exception as exc:
                self.value = None  # unknown is absent, not zero
                if not self._failing:
                    logger.warning("Cannot read the broker queue length (%s); forecasting without it", exc)
                self._failing = True
                self._disconnect(conn)
                conn = None
            self._wait_for_next_read(time.monotonic())
        self._disconnect(conn)

    def _wait_for_next_read(self, read_at: float) -> None:
        """Idle pool: the next read is ``idle_interval`` after the last; busy, or poked by an
        arrival: ``interval``; saturated (tasks wait inside the pool): ``saturated_interval``.
        Saturation is re-checked at the saturated cadence once poked, so a burst that fills the
        pool is read within ``saturated_interval`` of filling it. Bounded by time."""
        poked = False
        while not self._stop.is_set():
            now = time.monotonic()
            if self.saturated():
                due = read_at + self.saturated_interval
            elif poked or self.value or self.busy():
                due = read_at + self.interval
            else:
                due = read_at + self.idle_interval
            if now >= due:
                return
            if poked:
                self._stop.wait(min(due - now, self.saturated_interval))
            else:
                poked = self._wake.wait(due - now)
                self._wake.clear()

    def _disconnect(self, conn: Any) -> None:
        """Drop the channel and the connection (after an error, or at stop)."""
        self._close_channel()
        if conn is not None:
            try:
                conn.release()
            except Exception:
                pass


class AdaptiveAutoscaler:
    """Owns the predictor and controller for one pool; every call runs on the event loop."""

    def __init__(
        self,
        settings: PoolSettings,
        resize_to: Callable[[int, str], None],
        current: Callable[[], int],
        pool_backlog: Callable[[], int],
        running_ages: Callable[[float], Mapping[str, float]] = lambda now: {},
        oldest_wait: Callable[[float], float] = lambda now: 0.0,
        memory_pressure: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.predictor = Predictor(window_s=min(1.0, settings.control_interval))
        self.controller = Controller(
            min_children=settings.min_children,
            max_children=settings.max_children,
            target_wait_s=settings.target_wait,
            stabilization_s=settings.stabilization_window,
            # Draining is safe (no busy child is killed), so the pool may shed half of its
            # maximum per decision once demand has been lower for the whole window: between
            # bursts, every second at full size is paid for in idle processes.
            # Of the maximum in force: `--autoscale MAX,MIN` and the autoscale remote control
            # set the bounds after this is built.
            step_down_share=0.5,
            # The backlog is cleared within a control interval. Within the target wait was
            # tried: it reacted to every momentary queue of a steady load, and the window kept
            # those peaks (more children for nothing). A burst's start is caught by the
            # predictor's burst rate instead.
            drain_s=max(settings.control_interval, 0.5),
            max_utilization=settings.max_utilization,
        )
        self._resize_to = resize_to
        self._current = current
        self._pool_backlog = pool_backlog
        self._running_ages = running_ages
        self._oldest_wait = oldest_wait
        # Why no task may start now (memory over the admission threshold), or None: more
        # children would only take more memory, so the pool does not grow meanwhile.
        self._memory_pressure = memory_pressure
        self.probe: BacklogProbe | None = None
        self.last_forecast: Forecast | None = None
        self.last_decision: ScalingDecision | None = None
        self.last_change: ScalingDecision | None = None
        self.history: deque[ScalingDecision] = deque(maxlen=100)
        #: Every decision since start, by (direction, cause): both from bounded sets, so the
        #: Prometheus counter built from it has a bounded number of series.
        self.decision_counts: Counter[tuple[str, str]] = Counter()

    @property
    def bounds(self) -> tuple[int, int]:
        return self.controller.min_children, self.controller.max_children

    def set_bounds(self, min_children: int, max_children: int, now: float) -> None:
        self.controller.set_bounds(min_children, max_children)
        current = self._current()
        clamped = min(max(current, min_children), max_children)
        if clamped != current:
            self.decision_counts["up" if clamped > current else "down", "bounds"] += 1
            self._resize_to(clamped, f"bounds changed to [{min_children}, {max_children}]")

    def record_arrival(self, now: float, task_name: str) -> None:
        self.predictor.record_arrival(now, task_name)

    def record_completion(self, now: float, task_name: str, runtime: float) -> None:
        self.predictor.record_completion(now, task_name, runtime)

    def backlog(self) -> int:
        return self._pool_backlog() + self.broker_backlog()

    def broker_backlog(self) -> int:
        broker = self.probe.value if self.probe is not None else None
        return broker or 0

    def early_decision_at(self, now: float) -> float:
        """When an arrival may trigger a decision: ``now``, or ``EARLY_DECISION_GAP_S`` after
        the last one. A decision costs ~15-25 us, so the gap only bounds the cost under a flood
        (at most 100 per second); an arrival inside it gets a decision at its end, never none:
        the arrivals of a burst's first few milliseconds are its evidence."""
        if self.last_decision is None:
            return now
        return max(now, self.last_decision.at + EARLY_DECISION_GAP_S)

    def tick(self, now: float) -> ScalingDecision:
        horizon = self.settings.control_interval * 2
        broker = self.broker_backlog()
        forecast = self.predictor.forecast(
            now, self._pool_backlog() + broker, horizon, self._running_ages(now), broker,
            self._oldest_wait(now),
        )
        decision = self.controller.decide(now, forecast, self._current())
        if decision.direction == "up":
            pressure = self._memory_pressure()
            if pressure is not None:
                decision = ScalingDecision(
                    decision.at, decision.current, decision.desired, decision.current, "hold",
                    f"hold {decision.current}: {pressure}; no child is added until it falls "
                    f"(would be {decision.reason})",
                )
        self.last_forecast, self.last_decision = forecast, decision
        self.decision_counts[decision.direction, decision.cause] += 1
        if decision.direction != "hold" and decision.target != decision.current:
            self.history.append(decision)
            self.last_change = decision
            logger.info("Autoscale: %s", decision.reason)
            self._resize_to(decision.target, decision.reason)
        else:
            logger.debug("Autoscale: %s", decision.reason)
        return decision

    def next_tick_in(self) -> float:
        """Seconds to the next scheduled decision. An idle pool at its minimum has nothing to
        decide until work arrives, and arrivals trigger a decision themselves, so it ticks
        ``IDLE_TICK_FACTOR`` times less often: an idle worker should cost ~nothing."""
        interval = self.settings.control_interval
        forecast, decision = self.last_forecast, self.last_decision
        if forecast is None or decision is None:
            return interval
        idle = (forecast.predicted_rate == 0.0 and forecast.backlog == 0
                and decision.target <= self.controller.min_children
                and not self._running_ages(forecast.at))
        return interval * IDLE_TICK_FACTOR if idle else interval

    def state(self) -> dict[str, Any]:
        """JSON-friendly view for `inspect stats` and metrics (only what was measured)."""
        out: dict[str, Any] = {"min": self.controller.min_children, "max": self.controller.max_children}
        if self.probe is not None and self.probe.value is not None:
            out["broker-backlog"] = self.probe.value
        if self.last_forecast is not None:
            f = self.last_forecast
            out["forecast"] = {
                "arrival-rate": round(f.arrival_rate, 3),
                "predicted-rate": round(f.predicted_rate, 3),
                "service-time": round(f.service_time, 5),
                "backlog": f.backlog,
            }
        if self.last_decision is not None:
            # The latest tick, often a hold (and why: memory pressure holds a scale-up).
            out["last-tick"] = {
                "direction": self.last_decision.direction,
                "target": self.last_decision.target,
                "reason": self.last_decision.reason,
            }
        if self.last_change is not None:
            out["last-decision"] = {
                "direction": self.last_change.direction,
                "target": self.last_change.target,
                "reason": self.last_change.reason,
            }
        return out


class CeleryAutoscalerBridge(Autoscaler):
    """Stands in for Celery's autoscaler: same control surface, our decisions.

    ``update(max, min)`` (the ``autoscale`` remote command, Flower's Autoscale button) sets the
    predictive autoscaler's bounds; ``maybe_scale`` does nothing, because the reactive rule it
    implements (grow to the number of reserved tasks, shrink on a timer by killing) is what
    this pool replaces.
    """

    def __init__(self, pool: Any, autoscaler: AdaptiveAutoscaler, worker: Any, clock: Callable[[], float],
                 on_bounds: Callable[[], None] = lambda: None) -> None:
        low, high = autoscaler.bounds
        super().__init__(pool, high, low, worker=worker)
        self.adaptive = autoscaler
        self._clock = clock
        # The bounds changed: a prefetch sized for the maximum (RabbitMQ per-consumer QoS) is
        # resized (Celery's own autoscaler never moves the prefetch).
        self._on_bounds = on_bounds

    def body(self) -> None:  # pragma: no cover - never started as a thread
        self._is_shutdown.wait(1.0)

    def maybe_scale(self, req: Any = None) -> None:
        return None

    def update(self, max: int | None = None, min: int | None = None) -> tuple[int, int]:  # noqa: A002
        with self.mutex:
            low, high = self.adaptive.bounds
            low = low if min is None else int(min)
            high = high if max is None else int(max)
            low = _at_least_one(low)
            if low > high:
                raise ValueError(f"autoscale min={low} is greater than max={high}")
            self.adaptive.set_bounds(low, high, self._clock())
            self.max_concurrency, self.min_concurrency = high, low
        self._on_bounds()
        return high, low

    def info(self) -> dict[str, Any]:
        """``inspect stats['autoscaler']``, which Flower shows as its "Autoscaler options" table.

        Celery's keys (max, min, current, qty) first, then the forecast and the last resize.
        Flat scalars only: Flower renders each value with ``humanize``, which shows a nested
        dict raw and turns every ``-`` of a string into a space (hence "to", not "->").
        """
        low, high = self.adaptive.bounds
        out: dict[str, Any] = {"max": high, "min": low, "current": self.pool.num_processes,
                               "qty": self.qty, "predictive": True}
        forecast = self.adaptive.last_forecast
        if forecast is not None:
            out["forecast-per-second"] = round(forecast.predicted_rate, 2)
            out["arrivals-per-second"] = round(forecast.arrival_rate, 2)
            out["service-seconds"] = round(forecast.service_time, 4)
            out["backlog"] = forecast.backlog
        decision = self.adaptive.last_decision
        if decision is not None:
            out["desired"] = decision.desired
        change = self.adaptive.last_change
        if change is not None:
            out["last-decision"] = change.reason.replace("->", " to ")
            out["last-decision-cause"] = change.cause
            out["last-decision-age-seconds"] = round(max(0.0, self._clock() - change.at), 1)
        return out


def _at_least_one(value: int) -> int:
    return value if value >= 1 else 1
