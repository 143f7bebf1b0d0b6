"""A deterministic discrete-event simulation of the autoscaled pool.

Data flow::

    LoadTrace (rate over time) ──Poisson arrivals, seeded Random──► FIFO queue ──► ready children
          │                                                        │                  │
          │                        every control_interval_s:       │ backlog          │ runtimes
          │              Predictor.forecast ◄──────────────────────┴──────────────────┘
          │                    └──► Controller.decide ──► start children (ready after startup_s)
          │                                               or retire them (drain: finish, leave)
          └──► Tick records (true rate and the oracle's need, for comparison) ──► SimulationResult

The same pure Predictor and Controller the pool uses are driven here by simulated seconds, so a
test can replay a burst or a ramp in milliseconds and assert on scale-up delay, queue depth,
thrashing and that every task runs exactly once. The pool model is deliberately small: a child
runs one task at a time, starting children take ``startup_s`` to become ready, and a retired
child that is busy finishes its task before it leaves.

Randomness comes from one ``random.Random(seed)`` and is only drawn when an arrival is created
(its time, task kind and service time), so the workload of a seed is the same whatever the
controller does: two configurations can be compared on identical tasks.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from celery_adaptive.controller import (
    Controller,
    ScalingDecision,
    children_needed,
    utilization_floor,
)
from celery_adaptive.predictor import Forecast, Predictor

__all__ = [
    "ChildRecord",
    "LoadTrace",
    "SimulationConfig",
    "SimulationResult",
    "TaskKind",
    "TaskRecord",
    "Tick",
    "bursts",
    "ramp",
    "simulate",
    "sine",
    "steady",
    "sudden_stop",
]

# -- load traces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadTrace:
    """Arrival rate (tasks/s) as a function of time over ``[0, duration_s)``; 0 outside it."""

    name: str
    duration_s: float
    peak_rate: float
    """An upper bound of ``rate`` (Poisson thinning draws candidates at this rate)."""
    rate: Callable[[float], float]
    burst_starts: tuple[float, ...] = ()
    """Times at which the rate jumps up, for tests that measure the reaction to a burst."""

    def rate_at(self, t: float) -> float:
        return self.rate(t) if 0.0 <= t < self.duration_s else 0.0


def steady(rate: float, duration_s: float) -> LoadTrace:
    return LoadTrace(f"steady {rate:g}/s", duration_s, rate, lambda t: rate)


def bursts(
    base_rate: float,
    burst_rate: float,
    *,
    period_s: float,
    burst_s: float,
    duration_s: float,
    first_at: float | None = None,
) -> LoadTrace:
    """``base_rate`` with a ``burst_s`` long burst at ``burst_rate`` every ``period_s``."""
    start = period_s - burst_s if first_at is None else first_at

    def rate(t: float) -> float:
        phase = (t - start) % period_s
        return burst_rate if t >= start and phase < burst_s else base_rate

    starts = tuple(start + k * period_s for k in range(int((duration_s - start) // period_s) + 1))
    return LoadTrace(
        f"bursts {base_rate:g}->{burst_rate:g}/s",
        duration_s,
        max(base_rate, burst_rate),
        rate,
        tuple(s for s in starts if s < duration_s),
    )


def ramp(
    peak_rate: float, *, rise_s: float, hold_s: float, fall_s: float, base_rate: float = 0.0
) -> LoadTrace:
    """Linear rise from ``base_rate`` to ``peak_rate``, a plateau, and a linear fall back."""

    def rate(t: float) -> float:
        if t < rise_s:
            return base_rate + (peak_rate - base_rate) * t / rise_s
        if t < rise_s + hold_s:
            return peak_rate
        return base_rate + (peak_rate - base_rate) * max(0.0, 1 - (t - rise_s - hold_s) / fall_s)

    return LoadTrace(
        f"ramp {base_rate:g}->{peak_rate:g}/s",
        rise_s + hold_s + fall_s,
        max(peak_rate, base_rate),
        rate,
    )


def sine(mean_rate: float, amplitude: float, *, period_s: float, duration_s: float) -> LoadTrace:
    def rate(t: float) -> float:
        return max(0.0, mean_rate + amplitude * math.sin(2 * math.pi * t / period_s))

    return LoadTrace(
        f"sine {mean_rate:g}±{amplitude:g}/s", duration_s, mean_rate + abs(amplitude), rate
    )


def sudden_stop(rate: float, *, stop_at_s: float, duration_s: float) -> LoadTrace:
    """Full load until ``stop_at_s``, then nothing until ``duration_s``."""
    return LoadTrace(
        f"{rate:g}/s stopping at {stop_at_s:g} s",
        duration_s,
        rate,
        lambda t: rate if t < stop_at_s else 0.0,
    )


# -- configuration and results ----------------------------------------------------------------


@dataclass(frozen=True)
class TaskKind:
    name: str
    mean_service_s: float
    weight: float = 1.0


@dataclass(frozen=True)
class SimulationConfig:
    min_children: int = 1
    max_children: int = 16
    target_wait_s: float = 0.2
    stabilization_s: float = 30.0
    max_step_up: int | None = None
    max_step_down: int = 1
    drain_s: float = 1.0
    max_utilization: float = 0.5
    """As the pool's default ``adaptive_max_utilization``."""
    control_interval_s: float = 1.0
    early_decision_gap_s: float | None = 0.01
    """Like the pool, also decide on an arrival (or at the end of this gap after the last
    decision, when one was just made); None: only at control ticks."""
    startup_s: float = 0.05
    window_s: float = 1.0
    tasks: tuple[TaskKind, ...] = (TaskKind("work", 0.05),)
    service: Literal["exponential", "fixed"] = "exponential"
    seed: int = 0
    tail_s: float = 0.0
    """Seconds simulated after the trace ends (the run also lasts until every task finished)."""
    give_up_after_s: float = 3600.0
    """Past the trace and tail, how long to wait for the queue to drain before calling it a bug."""

    def __post_init__(self) -> None:
        for name in ("control_interval_s", "window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: must be > 0")
        if not self.startup_s >= 0:
            raise ValueError(f"invalid startup_s={self.startup_s!r}: must be >= 0")
        if not self.tasks or any(k.mean_service_s < 0 or k.weight <= 0 for k in self.tasks):
            raise ValueError(
                f"invalid tasks={self.tasks!r}: need kinds with service >= 0, weight > 0"
            )
        if self.service not in ("exponential", "fixed"):
            raise ValueError(f"invalid service={self.service!r}: exponential or fixed")

    @property
    def mean_service_s(self) -> float:
        total = sum(k.weight for k in self.tasks)
        return sum(k.weight * k.mean_service_s for k in self.tasks) / total


@dataclass(frozen=True)
class TaskRecord:
    id: int
    name: str
    arrived: float
    started: float
    finished: float
    child: int

    @property
    def wait(self) -> float:
        return self.started - self.arrived


@dataclass(frozen=True)
class ChildRecord:
    id: int
    spawned: float
    ready: float | None
    """None when the child was retired while still starting."""
    retired: float | None
    """When the controller asked it to leave (it may finish a task after this)."""
    stopped: float | None


@dataclass(frozen=True)
class Tick:
    at: float
    true_rate: float
    need: int
    """What an oracle knowing the true rate and mean service time would run (unclamped)."""
    queue: int
    ready: int
    """Children able to take a task at the tick (idle or busy, not starting or draining)."""
    children: int
    """Children kept after applying the decision (starting, idle or busy; not draining)."""
    forecast: Forecast
    decision: ScalingDecision
    early: bool = False
    """Made on an arrival between control ticks (as the pool does), not at a control tick."""


@dataclass(frozen=True)
class SimulationResult:
    trace: str
    config: SimulationConfig
    ticks: tuple[Tick, ...]
    tasks: tuple[TaskRecord, ...]
    children: tuple[ChildRecord, ...]
    arrivals: int
    """Tasks created by the trace; every one of them must appear once in ``tasks``."""
    end: float

    def max_queue(self, start: float = 0.0, end: float = math.inf) -> int:
        return max((t.queue for t in self.ticks if start <= t.at < end), default=0)

    def direction_changes(self, start: float = 0.0, end: float = math.inf) -> int:
        """How often a non-hold decision went the other way than the previous non-hold one."""
        moves = [
            t.decision.direction
            for t in self.ticks
            if start <= t.at < end and t.decision.direction != "hold"
        ]
        return sum(1 for a, b in zip(moves, moves[1:], strict=False) if a != b)

    def direction_changes_per_minute(self, start: float = 0.0, end: float | None = None) -> float:
        stop = self.end if end is None else end
        return self.direction_changes(start, stop) * 60.0 / max(stop - start, 1e-9)

    def first_tick(self, after: float, condition: Callable[[Tick], bool]) -> Tick | None:
        return next((t for t in self.ticks if t.at >= after and condition(t)), None)

    def waits(self) -> list[float]:
        return [t.wait for t in self.tasks]

    def peak_queue(self, start: float = 0.0, end: float = math.inf) -> int:
        """Most tasks waiting at any instant in ``[start, end)``, from the task records."""
        # At one instant starts go before arrivals, as the simulation dispatches them.
        changes = sorted(
            [(t.arrived, 1) for t in self.tasks] + [(t.started, -1) for t in self.tasks]
        )
        waiting, peak = 0, 0
        for at, delta in changes:
            waiting += delta
            if start <= at < end:
                peak = max(peak, waiting)
        return peak

    def capacity_at(self, t: float) -> int:
        """Children ready to run a task at ``t`` (started up and not retired)."""
        return sum(
            1
            for c in self.children
            if c.ready is not None and c.ready <= t and (c.retired is None or c.retired > t)
        )


# -- the simulation ---------------------------------------------------------------------------

# Event kinds in the order they run at the same instant: a child that becomes ready or frees up
# takes work before the arrival of that instant is queued, and the control tick sees the state
# after everything else that happened at its instant.
_READY, _FINISH, _ARRIVAL, _EARLY, _TICK = 0, 1, 2, 3, 4


@dataclass
class _Child:
    id: int
    spawned: float
    ready: float | None = None
    retired: float | None = None
    stopped: float | None = None
    task: int | None = None

    @property
    def starting(self) -> bool:
        return self.ready is None

    def record(self) -> ChildRecord:
        return ChildRecord(self.id, self.spawned, self.ready, self.retired, self.stopped)


@dataclass
class _Task:
    id: int
    kind: TaskKind
    arrived: float
    service: float
    started: float | None = None
    child: int | None = None


@dataclass
class _Sim:
    trace: LoadTrace
    config: SimulationConfig
    rng: random.Random
    predictor: Predictor
    controller: Controller
    events: list[tuple[float, int, int, int]] = field(default_factory=list)
    seq: int = 0
    queue: deque[int] = field(default_factory=deque)
    tasks: dict[int, _Task] = field(default_factory=dict)
    done: list[TaskRecord] = field(default_factory=list)
    children: dict[int, _Child] = field(default_factory=dict)
    ticks: list[Tick] = field(default_factory=list)
    next_child: int = 0
    created: int = 0
    weights: Sequence[float] = ()
    last_decision_at: float | None = None
    early_pending: bool = False

    def push(self, at: float, kind: int, ref: int) -> None:
        # seq breaks ties between events of one kind at one instant in creation order.
        self.seq += 1
        heapq.heappush(self.events, (at, kind, self.seq, ref))

    # -- workload --

    def schedule_next_arrival(self, after: float) -> None:
        peak = self.trace.peak_rate
        if peak <= 0:
            return
        t = after
        while True:
            t += self.rng.expovariate(peak)
            if t >= self.trace.duration_s:
                return
            # Thinning: a candidate at the peak rate is kept with probability rate(t)/peak.
            if self.rng.random() * peak < self.trace.rate_at(t):
                break
        kind = self.rng.choices(self.config.tasks, weights=self.weights)[0]
        if self.config.service == "fixed":
            service = kind.mean_service_s
        else:
            service = (
                self.rng.expovariate(1.0 / kind.mean_service_s) if kind.mean_service_s else 0.0
            )
        task = _Task(self.created, kind, t, service)
        self.created += 1
        self.tasks[task.id] = task
        self.push(t, _ARRIVAL, task.id)

    # -- pool --

    def spawn(self, now: float, warm: bool = False) -> None:
        child = _Child(self.next_child, now, ready=now if warm else None)
        self.next_child += 1
        self.children[child.id] = child
        if not warm:
            self.push(now + self.config.startup_s, _READY, child.id)

    def active(self) -> list[_Child]:
        return [c for c in self.children.values() if c.retired is None]

    def retire(self, now: float, count: int) -> None:
        # Cheapest first: a child still starting has cost nothing yet, an idle one loses
        # nothing, and a busy one must drain (finish its task) before it goes.
        def cost(c: _Child) -> tuple[int, int]:
            rank = 0 if c.starting else (1 if c.task is None else 2)
            return (rank, -c.id)

        for child in sorted(self.active(), key=cost)[:count]:
            child.retired = now
            if child.task is None:
                child.stopped = now

    def dispatch(self, now: float) -> None:
        idle = sorted(
            (
                c
                for c in self.children.values()
                if c.retired is None and not c.starting and c.task is None
            ),
            key=lambda c: c.id,
        )
        for child in idle:
            if not self.queue:
                return
            task = self.tasks[self.queue.popleft()]
            task.started, task.child = now, child.id
            child.task = task.id
            self.push(now + task.service, _FINISH, child.id)

    def on_finish(self, now: float, child_id: int) -> None:
        child = self.children[child_id]
        assert child.task is not None
        task = self.tasks.pop(child.task)
        assert task.started is not None and task.child is not None
        self.done.append(
            TaskRecord(task.id, task.kind.name, task.arrived, task.started, now, task.child)
        )
        self.predictor.record_completion(now, task.kind.name, now - task.started)
        child.task = None
        if child.retired is not None:
            child.stopped = now  # drained: its last task is done, it leaves
        self.dispatch(now)

    def on_tick(self, now: float, early: bool = False) -> None:
        config = self.config
        self.last_decision_at = now
        active = self.active()
        ready = sum(1 for c in active if not c.starting)
        horizon = config.control_interval_s + config.startup_s
        oldest = now - self.tasks[self.queue[0]].arrived if self.queue else 0.0
        forecast = self.predictor.forecast(now, len(self.queue), horizon, oldest_wait_s=oldest)
        decision = self.controller.decide(now, forecast, len(active))
        if decision.target > len(active):
            for _ in range(decision.target - len(active)):
                self.spawn(now)
        elif decision.target < len(active):
            self.retire(now, len(active) - decision.target)
        true_rate = self.trace.rate_at(now)
        need = max(
            children_needed(true_rate, config.mean_service_s, config.target_wait_s),
            utilization_floor(true_rate, config.mean_service_s, config.max_utilization),
        )
        self.ticks.append(
            Tick(
                now, true_rate, need, len(self.queue), ready, len(self.active()), forecast, decision,
                early,
            )
        )

    def maybe_decide_early(self, now: float) -> None:
        """As the pool: decide now, or once at the end of the gap after the last decision."""
        gap = self.config.early_decision_gap_s
        if gap is None:
            return
        if self.last_decision_at is None or now >= self.last_decision_at + gap:
            self.on_tick(now, early=True)
        elif not self.early_pending:
            self.early_pending = True
            self.push(self.last_decision_at + gap, _EARLY, 0)


def simulate(trace: LoadTrace, config: SimulationConfig | None = None) -> SimulationResult:
    """Replay ``trace`` through a Predictor, a Controller and a model pool; fully deterministic."""
    config = config or SimulationConfig()
    sim = _Sim(
        trace=trace,
        config=config,
        rng=random.Random(config.seed),
        predictor=Predictor(window_s=config.window_s),
        controller=Controller(
            min_children=config.min_children,
            max_children=config.max_children,
            target_wait_s=config.target_wait_s,
            stabilization_s=config.stabilization_s,
            max_step_up=config.max_step_up,
            max_step_down=config.max_step_down,
            drain_s=config.drain_s,
            max_utilization=config.max_utilization,
        ),
        weights=[k.weight for k in config.tasks],
    )
    # A worker starts with its minimum already running.
    for _ in range(config.min_children):
        sim.spawn(0.0, warm=True)
    sim.schedule_next_arrival(0.0)
    tick_index = 0
    sim.push(0.0, _TICK, tick_index)
    planned_end = trace.duration_s + config.tail_s
    now = 0.0
    while sim.events:
        now, kind, _, ref = heapq.heappop(sim.events)
        if kind == _READY:
            child = sim.children[ref]
            if child.retired is None:
                child.ready = now
                sim.dispatch(now)
        elif kind == _FINISH:
            sim.on_finish(now, ref)
        elif kind == _EARLY:
            sim.early_pending = False
            sim.maybe_decide_early(now)
            sim.dispatch(now)
        elif kind == _ARRIVAL:
            task = sim.tasks[ref]
            sim.predictor.record_arrival(now, task.kind.name)
            sim.queue.append(task.id)
            sim.maybe_decide_early(now)  # before dispatch: a child retired now takes nothing
            sim.dispatch(now)
            sim.schedule_next_arrival(now)
        else:
            sim.on_tick(now)
            tick_index += 1
            # Ticks run until the planned end and then until the last task is done.
            if now < planned_end or sim.tasks:
                if now > planned_end + config.give_up_after_s:
                    raise RuntimeError(f"{len(sim.tasks)} tasks still unfinished at {now:g} s")
                # Multiplying rather than adding keeps tick times exact multiples.
                sim.push(tick_index * config.control_interval_s, _TICK, tick_index)
    return SimulationResult(
        trace=trace.name,
        config=config,
        ticks=tuple(sim.ticks),
        tasks=tuple(sorted(sim.done, key=lambda r: r.id)),
        children=tuple(c.record() for c in sim.children.values()),
        arrivals=sim.created,
        end=now,
    )
