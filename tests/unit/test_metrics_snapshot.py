"""Pure metric arithmetic: percentiles, the sliding window, aggregation, the event's fields."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_adaptive.metrics.events import RESERVED_FIELDS, event_fields
from celery_adaptive.metrics.snapshot import (
    Aggregator,
    ChildReading,
    Completion,
    HostReading,
    LatencyWindow,
    PoolReading,
    ProcessReading,
    describe_autoscaler,
    percentile,
    percentiles,
    prune_none,
    rate,
    utilization,
)


# -- percentiles -------------------------------------------------------------------------
def test_percentile_nearest_rank_returns_observed_values():
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([1, 2, 3, 4], 50) == 2
    assert percentile([1, 2, 3, 4], 51) == 3


def test_percentile_rejects_empty_and_bad_q():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1], 0)
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_percentiles_sorts_and_is_none_without_values():
    assert percentiles([]) is None
    p = percentiles([0.3, 0.1, 0.2] * 10)
    assert p is not None and (p.p50, p.p95, p.p99) == (0.2, 0.3, 0.3)


def test_utilization_and_rate():
    assert utilization(busy_now=3.0, at_now=12.0, busy_before=1.0, at_before=10.0) == 1.0
    assert utilization(1.5, 12.0, 1.0, 10.0) == 0.25
    assert utilization(5.0, 12.0, 1.0, 10.0) == 1.0  # clipped
    assert utilization(1.0, 10.0, 1.0, 10.0) is None  # no span: not measurable
    assert rate(30, 10, 2.0) == 10.0
    assert rate(5, 10, 2.0) == 0.0
    assert rate(5, 1, 0.0) is None


# -- the window --------------------------------------------------------------------------
def test_window_forgets_old_completions_and_groups_by_name():
    window = LatencyWindow(span_s=10.0)
    window.extend(Completion(at=t, task_name="old", wait_s=9.0, run_s=9.0) for t in (0.0, 1.0))
    window.extend(
        Completion(at=20.0 + i, task_name="a" if i % 2 else "b", wait_s=i / 100, run_s=i / 10)
        for i in range(10)
    )
    overall, by_name = window.stats(now=29.0)
    assert overall.count == 10  # the two "old" ones fell out of the 10 s window
    assert set(by_name) == {"a", "b"}
    assert by_name["a"].count == 5 and by_name["b"].count == 5
    assert overall.run is not None and overall.run.p99 == pytest.approx(0.9)
    assert by_name["b"].run is not None and by_name["b"].run.p50 == pytest.approx(0.4)


def test_window_keeps_only_the_busiest_names_and_tolerates_missing_times():
    window = LatencyWindow(span_s=100.0)
    for i, name in enumerate(["x"] * 3 + ["y"] * 2 + ["z"]):
        window.extend([Completion(at=float(i), task_name=name, wait_s=None, run_s=None)])
    overall, by_name = window.stats(now=10.0, max_names=2)
    assert set(by_name) == {"x", "y"}
    assert overall.count == 6 and overall.wait is None and overall.run is None


def test_window_is_bounded():
    window = LatencyWindow(span_s=1000.0, max_samples=5)
    window.extend(Completion(float(i), "t", 0.0, 0.0) for i in range(50))
    assert len(window) == 5


_batch = st.lists(
    st.tuples(
        st.floats(0, 50), st.sampled_from("abc"),
        st.one_of(st.none(), st.floats(0, 10)), st.one_of(st.none(), st.floats(0, 10)),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(_batch, max_size=8), span=st.floats(1, 120), cap=st.integers(1, 40),
       now=st.floats(0, 450))
def test_window_matches_the_brute_force_definition(batches, span, cap, now):
    """Batched, pre-sorted bookkeeping gives exactly the percentiles of the newest ``cap``
    completions not older than ``span``. Batch ``i`` holds times in [50 i, 50 i + 50]: readings
    come in time order, as the supervisor's clock makes them."""
    window = LatencyWindow(span_s=span, max_samples=cap)
    arrived: list[Completion] = []
    for i, batch in enumerate(batches):
        items = [Completion(50.0 * i + at, *rest) for at, *rest in batch]
        window.extend(items)
        arrived.extend(sorted(items, key=lambda c: c.at))
    kept = [c for c in arrived[-cap:] if c.at >= now - span] if arrived else []
    overall, by_name = window.stats(now=now, max_names=10)
    assert overall.count == len(kept)
    assert overall.wait == percentiles(c.wait_s for c in kept if c.wait_s is not None)
    assert overall.run == percentiles(c.run_s for c in kept if c.run_s is not None)
    for name in {c.task_name for c in kept}:
        mine = [c for c in kept if c.task_name == name]
        assert by_name[name].count == len(mine)
        assert by_name[name].run == percentiles(c.run_s for c in mine if c.run_s is not None)


# -- aggregation -------------------------------------------------------------------------
def _child(child_id: int, busy: float, *, state: str = "idle", task: str | None = None,
           created: float = 0.0) -> ChildReading:
    return ChildReading(
        child_id=child_id, pid=1000 + child_id, slot=child_id, cpu=child_id, state=state,
        created_at=created, tasks_done=3, busy_total_s=busy, local_queue=child_id, steals=2 * child_id,
        task_name=task, task_running_s=1.5 if task else None,
    )


def _reading(at: float, children: tuple[ChildReading, ...], *, received: int, completed: int,
             completions: tuple[Completion, ...] = (), autoscaler: dict | None = None) -> PoolReading:
    return PoolReading(
        at=at, wall=1_700_000_000.0 + at, hostname="w@h", target=2, min_children=1, max_children=4,
        counters={"received": received, "started": completed, "succeeded": completed, "failed": 0,
                  "lost": 0, "hard_timeouts": 0},
        scheduler={"local_hits": 1, "steals": 2},
        queued=4, in_flight=1, completed=completed, children=children, completions=completions,
        autoscaler=autoscaler,
    )


def test_aggregate_computes_rates_utilization_and_sums():
    agg = Aggregator(interval=2.0)
    first = agg.aggregate(
        _reading(10.0, (_child(1, 0.0), _child(2, 5.0, state="busy")), received=10, completed=8),
    )
    # First sight: utilization over the child's life so far, no rates yet.
    assert first.seq == 1
    assert first.arrivals_per_s is None and first.completions_per_s is None
    assert [c.utilization for c in first.children] == [0.0, 0.5]

    second = agg.aggregate(
        _reading(12.0, (_child(1, 0.2), _child(2, 7.0, state="busy", task="proj.spin")),
                 received=30, completed=18,
                 completions=(Completion(11.0, "proj.spin", 0.01, 0.5), Completion(11.5, "proj.add", None, None))),
        processes={1001: ProcessReading(1.0, 10_000), 1002: ProcessReading(99.0, 20_000)},
        host=HostReading(cpu_percent=55.0, load_average=(1.0, 0.5, 0.25), memory_percent=40.0),
        broker_backlog=7,
    )
    assert second.seq == 2
    assert second.arrivals_per_s == 10.0 and second.completions_per_s == 5.0
    by_pid = {c.pid: c for c in second.children}
    assert by_pid[1001].utilization == pytest.approx(0.1)
    assert by_pid[1002].utilization == pytest.approx(1.0)
    assert by_pid[1002].cpu_percent == 99.0 and by_pid[1002].task_name == "proj.spin"
    assert by_pid[1002].steals == 4 and by_pid[1002].local_queue == 2
    assert second.utilization == pytest.approx(0.55)
    assert second.cpu_percent == 100.0 and second.rss_bytes == 30_000
    assert second.broker_backlog == 7
    assert second.latency.count == 2
    assert second.latency.run is not None and second.latency.run.p50 == 0.5
    assert second.states == {"idle": 1, "busy": 1}
    assert second.tasks["received"] == 30 and second.tasks["completed"] == 18


def test_unmeasured_values_are_absent_not_zero():
    snapshot = Aggregator(interval=2.0).aggregate(
        _reading(5.0, (_child(1, 0.0, created=5.0),), received=0, completed=0)
    )
    data = snapshot.to_dict()
    child = data["children"][0]
    assert "cpu_percent" not in child and "rss_bytes" not in child  # psutil gave nothing
    assert "utilization" not in child  # a zero-length life has no busy fraction
    assert "arrivals_per_s" not in data["pool"] and "broker_backlog" not in data["pool"]
    assert "autoscaler" not in data
    assert data["host"] == {}
    assert data["latency"]["overall"] == {"count": 0}
    json.dumps(data)


def test_child_that_left_is_forgotten():
    agg = Aggregator(interval=1.0)
    agg.aggregate(_reading(1.0, (_child(1, 0.5), _child(2, 0.0)), received=0, completed=0))
    snap = agg.aggregate(_reading(2.0, (_child(1, 1.5),), received=0, completed=0))
    assert [c.pid for c in snap.children] == [1001]
    assert snap.children[0].utilization == pytest.approx(1.0)


def test_summary_is_flat_and_json():
    agg = Aggregator(interval=2.0)
    snap = agg.aggregate(
        _reading(1.0, (_child(1, 0.5),), received=1, completed=1,
                 completions=(Completion(1.0, "t", 0.002, 0.1),),
                 autoscaler={"change": {"direction": "up", "target": 3, "reason": "wait 0.4s > 0.2s"}}),
    )
    summary = snap.summary()
    json.dumps(summary)
    assert summary["wait_p50_s"] == 0.002 and summary["run_p99_s"] == 0.1
    assert summary["last_scaling"] == "wait 0.4s > 0.2s"
    assert all(not isinstance(v, (dict, list)) for v in summary.values())


# -- autoscaler view ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Forecast:
    at: float
    arrival_rate: float
    predicted_rate: float
    backlog: int


@dataclass(frozen=True)
class _Decision:
    at: float
    target: int
    direction: str
    reason: str


class _Scaler:
    def __init__(self) -> None:
        self.last_forecast = _Forecast(at=8.0, arrival_rate=2.0, predicted_rate=3.0, backlog=4)
        self.last_decision = _Decision(at=9.0, target=2, direction="hold", reason="enough")
        self.last_change = None
        self.probe = object()


def test_describe_autoscaler_reads_what_exists_only():
    assert describe_autoscaler(None, 10.0) is None
    assert describe_autoscaler(object(), 10.0) is None
    view = describe_autoscaler(_Scaler(), 10.0)
    assert view == {
        "forecast": {"age_s": 2.0, "arrival_rate": 2.0, "predicted_rate": 3.0, "backlog": 4},
        "decision": {"age_s": 1.0, "target": 2, "direction": "hold", "reason": "enough"},
    }
    mapping = describe_autoscaler({"decision": {"direction": "up", "bad": object()}}, 0.0)
    assert mapping == {"decision": {"direction": "up"}}


# -- the event ---------------------------------------------------------------------------
def test_event_fields_avoid_names_celery_and_flower_read():
    snap = Aggregator(interval=2.0).aggregate(
        _reading(1.0, (_child(1, 0.5),), received=1, completed=0, autoscaler={"decision": {"reason": "x"}})
    )
    fields = event_fields(snap)
    assert "hostname" not in fields
    assert not RESERVED_FIELDS & set(fields)
    for banned in ("active", "processed", "freq", "loadavg", "pid", "clock"):
        assert banned not in fields
    assert not any(name.startswith("sw_") for name in fields)
    assert set(fields) == {"schema", "seq", "taken_at", "interval", "pool", "latency", "children",
                           "host", "autoscaler"}


def test_prune_none_is_recursive():
    assert prune_none({"a": None, "b": {"c": None, "d": 1}, "e": [{"f": None}]}) == {"b": {"d": 1}, "e": [{}]}


