"""Snapshots with every metric measured (the memory guard's too), built from real readings by the real `Aggregator`:
what a busy autoscaling worker publishes (for the exposition, lint and dashboard tests)."""

from __future__ import annotations

from celery_adaptive.controller import ScalingDecision
from celery_adaptive.metrics.snapshot import (
    Aggregator,
    ChildReading,
    Completion,
    HostReading,
    PoolReading,
    ProcessReading,
    Snapshot,
    describe_autoscaler,
)
from celery_adaptive.predictor import Forecast

HOSTNAME = "celery@web-1"
COUNTERS = {
    "received": 40, "started": 36, "succeeded": 30, "failed": 4, "lost": 1, "revoked_before_start": 1,
    "children_started": 5, "children_exited": 2, "children_crashed": 1, "hard_timeouts": 1,
    "soft_timeouts": 2, "bad_messages": 0,
    "memory_soft_limit": 2, "memory_hard_limit": 1, "memory_stopped_tasks": 1,
}
#: The memory guard's state (`MemoryControl.describe`) with the watcher on.
MEMORY = {
    "admission": "running", "pauses": 3, "paused_s": 4.5, "held": 1, "reserved_bytes": 0,
    "heavy_task_bytes": 64 * 2**20, "tasks": {"proj.tasks.resize": 150 * 2**20}, "used_bytes": 1_500_000_000,
    "limit_bytes": 4_000_000_000, "source": "cgroup", "threshold_bytes": 3_400_000_000,
}


class _Scaler:
    """The attributes `describe_autoscaler` and the service read from the pool's autoscaler."""

    def __init__(self, at: float) -> None:
        self.last_forecast = Forecast(
            at=at, arrival_rate=11.5, predicted_rate=14.25, trend=0.5, service_time=0.12, backlog=7,
            horizon_s=2.0, broker_backlog=3, current_rate=12.0,
        )
        self.last_decision = ScalingDecision(at, 3, 4, 4, "up", "up 3->4: forecast ...", "forecast")
        self.last_change = self.last_decision
        self.decision_counts = {("up", "forecast"): 2, ("hold", "steady"): 9, ("down", "lower_demand"): 1}


def _child(child_id: int, slot: int, busy: float, state: str, task: str | None = None) -> ChildReading:
    return ChildReading(
        child_id=child_id, pid=40_000 + child_id, slot=slot, cpu=slot, state=state, created_at=0.0,
        tasks_done=5 * child_id, busy_total_s=busy, local_queue=0, steals=child_id,
        task_name=task, task_running_s=0.4 if task else None,
        uss_bytes=30_000_000 * child_id, pss_bytes=35_000_000 * child_id,
    )


def _reading(at: float, completions: tuple[Completion, ...], scaler: _Scaler) -> PoolReading:
    children = (
        _child(1, 0, busy=at * 0.9, state="busy", task="proj.tasks.resize"),
        _child(2, 1, busy=at * 0.2, state="idle"),
        _child(3, 2, busy=0.0, state="starting"),
    )
    return PoolReading(
        at=at, wall=1_764_000_000.0 + at, hostname=HOSTNAME, target=4, min_children=1, max_children=8,
        counters=COUNTERS, scheduler={"local_hits": 10, "steals": 2}, queued=3, in_flight=1,
        completed=35, children=children, completions=completions,
        autoscaler=describe_autoscaler(scaler, at), broker_queues=("celery",), broker_backlog=3,
        decisions=scaler.decision_counts, memory=MEMORY,
    )


def full_snapshot() -> Snapshot:
    """A second snapshot (so rates exist) with completions on two queues, some stamped with
    their publish time, a busy, an idle and a starting child, and an autoscaler."""
    aggregator = Aggregator(interval=2.0)
    processes = {40_001: ProcessReading(95.0, 80_000_000), 40_002: ProcessReading(3.0, 70_000_000),
                 40_003: ProcessReading(None, 20_000_000)}
    host = HostReading(60.0, (1.0, 0.8, 0.5), 40.0, 2_000_000_000)
    aggregator.aggregate(_reading(10.0, (), _Scaler(10.0)), processes, host, 3)
    completions = tuple(
        Completion(11.0 + i / 10, name, 0.002 * i, 0.01 * (i + 1), queue, 0.05 * i if i % 2 else None)
        for i, (name, queue) in enumerate(
            [("proj.tasks.resize", "images"), ("proj.tasks.email", "celery")] * 6
        )
    )
    return aggregator.aggregate(_reading(12.0, completions, _Scaler(12.0)), processes, host, 3)
