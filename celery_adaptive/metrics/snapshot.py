"""Metric snapshots: what the pool measured at one instant, and the pure arithmetic on them.

Data flow (see `service` for the threads)::

    event-loop thread (L)                    sampler thread
    ─────────────────────                    ──────────────
    job done ─> Completion ─┐
    timer ────> PoolReading ┴─> queue ─────> + ProcessReading per pid, HostReading (psutil)
                                             Aggregator.aggregate(...) ─> Snapshot
                                                 (rates, utilization, latency percentiles)

Nothing here reads a clock, touches a process or does I/O: readings carry their own times, so
the aggregation is replayable in unit tests. A value that was not measured is ``None`` and is
left out of the published form; nothing stands in for a measurement. Task arguments and
results never enter a reading, only task names and times.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from typing import Any, NamedTuple

from celery_adaptive.metrics.histograms import Histogram, HistogramSeries

#: Bumped when a published field changes meaning or disappears.
SCHEMA_VERSION = 1
#: Queue wait and run time percentiles cover the completions of the last this many seconds.
LATENCY_WINDOW_S = 60.0
#: At most this many completions are kept in the window (a burst cannot grow it unbounded).
LATENCY_MAX_SAMPLES = 10_000
#: Per-task-name latency is published for at most this many names (the busiest ones).
MAX_TASK_NAMES = 20
PERCENTILES = (50, 95, 99)


# ---------------------------------------------------------------------------- readings
class Completion(NamedTuple):
    """One job's outcome was reported (success, failure, lost or time limit).

    A named tuple, not a frozen dataclass: one is built on the event loop for every job, and a
    tuple costs a fraction of a frozen dataclass's ``__init__``.
    """

    at: float
    """Monotonic time of the report."""
    task_name: str
    wait_s: float | None
    """From the pool receiving the job to a child starting it; None if it never started."""
    run_s: float | None
    """Run time the child measured; None when the child did not report one (lost, killed)."""
    queue: str = ""
    """The message's routing key (its queue under default routing); "" when unknown."""
    queue_wait_s: float | None = None
    """From the producer publishing it to a child starting it (see `publish_time`); None
    when the message carries no publish time or the job never started."""


@dataclass(frozen=True)
class ChildReading:
    """One child as the supervisor sees it, read on the event-loop thread."""

    child_id: int
    pid: int
    slot: int
    cpu: int | None
    state: str
    created_at: float
    tasks_done: int
    busy_total_s: float
    """Seconds spent busy since the child started, up to the reading."""
    local_queue: int
    steals: int
    task_name: str | None = None
    task_running_s: float | None = None
    uss_bytes: int | None = None
    """Unique and proportional set sizes, from the memory watcher (when it reads them)."""
    pss_bytes: int | None = None


@dataclass(frozen=True)
class PoolReading:
    """The pool's books at one instant, read on the event-loop thread."""

    at: float
    """Monotonic time of the reading."""
    wall: float
    """Epoch seconds of the reading (for readers on other hosts)."""
    hostname: str
    target: int
    min_children: int
    max_children: int
    counters: Mapping[str, int]
    scheduler: Mapping[str, int]
    queued: int
    in_flight: int
    completed: int
    """Outcomes reported since start (every job is counted once, whatever its outcome)."""
    children: tuple[ChildReading, ...]
    completions: tuple[Completion, ...] = ()
    autoscaler: Mapping[str, Any] | None = None
    broker_queues: tuple[str, ...] = ()
    broker_backlog: int | None = None
    """Messages waiting in the broker, when something on L already knows (the autoscaler)."""
    memory: Mapping[str, Any] | None = None
    """The memory guard's state (`MemoryControl.describe`), when the watcher runs."""
    decisions: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """The autoscaler's decisions since start by (direction, cause)."""


@dataclass(frozen=True)
class ProcessReading:
    cpu_percent: float | None = None
    rss_bytes: int | None = None


@dataclass(frozen=True)
class HostReading:
    cpu_percent: float | None = None
    load_average: tuple[float, float, float] | None = None
    memory_percent: float | None = None
    memory_used_bytes: int | None = None


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Percentiles:
    p50: float
    p95: float
    p99: float


@dataclass(frozen=True)
class LatencyStats:
    count: int
    wait: Percentiles | None
    run: Percentiles | None


@dataclass(frozen=True)
class ChildMetrics:
    pid: int
    slot: int
    cpu: int | None
    state: str
    tasks_done: int
    utilization: float | None
    cpu_percent: float | None
    rss_bytes: int | None
    local_queue: int
    steals: int
    task_name: str | None
    task_running_s: float | None
    uss_bytes: int | None = None
    pss_bytes: int | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything published for one interval. `to_dict` is the one published form."""

    seq: int
    hostname: str
    taken_at: float
    interval: float
    children_current: int
    target: int
    min_children: int
    max_children: int
    states: Mapping[str, int]
    tasks: Mapping[str, int]
    counters: Mapping[str, int]
    scheduler: Mapping[str, int]
    queued: int
    in_flight: int
    arrivals_per_s: float | None
    completions_per_s: float | None
    utilization: float | None
    cpu_percent: float | None
    rss_bytes: int | None
    broker_backlog: int | None
    latency_window_s: float
    latency: LatencyStats
    latency_by_task: Mapping[str, LatencyStats]
    children: tuple[ChildMetrics, ...]
    host: HostReading
    autoscaler: Mapping[str, Any] | None = None
    memory: Mapping[str, Any] | None = None
    decisions: Mapping[tuple[str, str], int] = field(default_factory=dict)
    histograms: Mapping[str, tuple[HistogramSeries, ...]] = field(default_factory=dict)
    """Cumulative since start (`histograms`): ``runtime`` and ``queue_wait`` by (task name,
    queue), ``pool_wait`` unlabelled. For Prometheus only; not published to Redis or events."""
    schema: int = field(default=SCHEMA_VERSION)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable form published to Redis and (less ``hostname``) as an event."""
        data: dict[str, Any] = {
            "schema": self.schema,
            "hostname": self.hostname,
            "seq": self.seq,
            "taken_at": self.taken_at,
            "interval": self.interval,
            "pool": {
                "children": {
                    "current": self.children_current,
                    "target": self.target,
                    "min": self.min_children,
                    "max": self.max_children,
                    "states": dict(self.states),
                },
                "tasks": dict(self.tasks),
                "counters": dict(self.counters),
                "scheduler": dict(self.scheduler),
                "queued": self.queued,
                "in_flight": self.in_flight,
                "arrivals_per_s": self.arrivals_per_s,
                "completions_per_s": self.completions_per_s,
                "utilization": self.utilization,
                "cpu_percent": self.cpu_percent,
                "rss_bytes": self.rss_bytes,
                "broker_backlog": self.broker_backlog,
            },
            "latency": {
                "window_s": self.latency_window_s,
                "overall": _latency_dict(self.latency),
                "tasks": {name: _latency_dict(s) for name, s in self.latency_by_task.items()},
            },
            "children": [dataclasses.asdict(c) for c in self.children],
            "host": dataclasses.asdict(self.host),
            "autoscaler": dict(self.autoscaler) if self.autoscaler else None,
            "memory": dict(self.memory) if self.memory else None,
        }
        return rounded(prune_none(data))

    def to_history(self) -> dict[str, str]:
        """One entry of the Redis history stream: `HISTORY_FIELDS`, flat, as short strings.

        Every entry has the same fields in the same order ("" for what was not measured), so
        Redis stores the field names once per stream node and only the values per entry
        (about 120 bytes, against ~3.3 KB for the whole snapshot as JSON).
        """
        wait = self.latency.wait
        run = self.latency.run
        forecast = (self.autoscaler or {}).get("forecast")
        change = (self.autoscaler or {}).get("change")
        values: dict[str, Any] = {
            "seq": self.seq,
            "taken_at_ms": int(self.taken_at * 1000),
            "children": self.children_current,
            "target": self.target,
            "min": self.min_children,
            "max": self.max_children,
            "busy": self.states.get("busy", 0),
            "queued": self.queued,
            "in_flight": self.in_flight,
            "received": self.tasks.get("received", 0),
            "succeeded": self.tasks.get("succeeded", 0),
            "failed": self.tasks.get("failed", 0),
            "lost": self.tasks.get("lost", 0),
            "utilization": self.utilization,
            "arrivals_per_s": self.arrivals_per_s,
            "completions_per_s": self.completions_per_s,
            "wait_p99_s": wait.p99 if wait is not None else None,
            "run_p99_s": run.p99 if run is not None else None,
            "broker_backlog": self.broker_backlog,
            "cpu_percent": self.cpu_percent,
            "rss_bytes": self.rss_bytes,
            "forecast_per_s": forecast.get("predicted_rate") if isinstance(forecast, Mapping) else None,
            "scaled": (f"{change.get('direction')}:{change.get('target')}"
                       if isinstance(change, Mapping) else None),
        }
        return {name: _short(value) for name, value in values.items()}

    def summary(self) -> dict[str, Any]:
        """A compact, flat view for ``celery inspect stats`` (Flower's Pool tab shows it)."""
        out: dict[str, Any] = {
            "seq": self.seq,
            "taken_at": self.taken_at,
            "interval": self.interval,
            "utilization": self.utilization,
            "cpu_percent": self.cpu_percent,
            "rss_bytes": self.rss_bytes,
            "arrivals_per_s": self.arrivals_per_s,
            "completions_per_s": self.completions_per_s,
            "broker_backlog": self.broker_backlog,
            "host_cpu_percent": self.host.cpu_percent,
            "host_memory_percent": self.host.memory_percent,
            "latency_window_s": self.latency_window_s,
            "completions_in_window": self.latency.count,
        }
        for kind, stats in (("wait", self.latency.wait), ("run", self.latency.run)):
            if stats is not None:
                for q in PERCENTILES:
                    out[f"{kind}_p{q}_s"] = getattr(stats, f"p{q}")
        if self.autoscaler:
            change = self.autoscaler.get("change")
            if isinstance(change, Mapping):
                out["last_scaling"] = change.get("reason")
        if self.memory:
            for key in ("admission", "used_bytes", "limit_bytes", "held", "pauses", "paused_s"):
                out[f"memory_{key}"] = self.memory.get(key)
        return rounded(prune_none(out))


def _latency_dict(stats: LatencyStats) -> dict[str, Any]:
    return prune_none(
        {
            "count": stats.count,
            "wait": dataclasses.asdict(stats.wait) if stats.wait is not None else None,
            "run": dataclasses.asdict(stats.run) if stats.run is not None else None,
        }
    )


#: The fields of a history stream entry (`Snapshot.to_history`), in order.
HISTORY_FIELDS = (
    "seq", "taken_at_ms", "children", "target", "min", "max", "busy", "queued", "in_flight",
    "received", "succeeded", "failed", "lost", "utilization", "arrivals_per_s",
    "completions_per_s", "wait_p99_s", "run_p99_s", "broker_backlog", "cpu_percent", "rss_bytes",
    "forecast_per_s", "scaled",
)


def _short(value: Any) -> str:
    """A stream value: "" when unmeasured, integers as such, floats to 4 significant digits."""
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return f"{value:.4g}"
    return str(value)


def rounded(value: Any) -> Any:
    """Floats to 4 decimals (0.1 ms for seconds) in nested data: the published JSON carries no
    digits a reader could use, and every snapshot is smaller for it."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def prune_none(value: Any) -> Any:
    """Drop ``None`` values from nested dicts: an unmeasured value is absent, not null."""
    if isinstance(value, dict):
        return {k: prune_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_none(v) for v in value]
    return value


# ---------------------------------------------------------------------------- arithmetic
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile of already sorted values (an observed value, never invented)."""
    if not sorted_values:
        raise ValueError("no values")
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q!r}")
    rank = math.ceil(q / 100 * len(sorted_values))
    return float(sorted_values[max(rank, 1) - 1])


def percentiles(values: Iterable[float]) -> Percentiles | None:
    return _percentiles_sorted(sorted(values))


def utilization(busy_now: float, at_now: float, busy_before: float, at_before: float) -> float | None:
    """Busy fraction of the span between two readings, clipped to [0, 1]."""
    span = at_now - at_before
    if span <= 0:
        return None
    return min(1.0, max(0.0, (busy_now - busy_before) / span))


def rate(count_now: int, count_before: int, span: float) -> float | None:
    if span <= 0:
        return None
    return max(0, count_now - count_before) / span


class _Values(NamedTuple):
    """How many completions of one task name, and their waits and run times, each sorted."""

    completions: int
    waits: list[float]
    runs: list[float]

    @classmethod
    def of(cls, items: Sequence[Completion]) -> _Values:
        return cls(
            len(items),
            sorted([c.wait_s for c in items if c.wait_s is not None]),
            sorted([c.run_s for c in items if c.run_s is not None]),
        )

    @classmethod
    def merged(cls, parts: Sequence[_Values]) -> _Values:
        """Sorting concatenated sorted runs is a near-linear merge for Timsort."""
        return cls(
            sum(p.completions for p in parts),
            sorted(chain.from_iterable(p.waits for p in parts)),
            sorted(chain.from_iterable(p.runs for p in parts)),
        )


class _Batch:
    """The completions of one reading, oldest first, with their values grouped by task name."""

    __slots__ = ("items", "by_name")

    def __init__(self, items: list[Completion]) -> None:
        self.items = items
        grouped: dict[str, list[Completion]] = {}
        for item in items:
            grouped.setdefault(item.task_name, []).append(item)
        self.by_name = {name: _Values.of(group) for name, group in grouped.items()}

    @property
    def newest(self) -> float:
        return self.items[-1].at

    @property
    def oldest(self) -> float:
        return self.items[0].at


class LatencyWindow:
    """The completions of the last ``span_s`` seconds (at most the newest ``max_samples``), for
    exact nearest-rank percentiles.

    Each batch (one reading's completions) is grouped and sorted once, when it arrives; a
    statistic then sorts the concatenation of already sorted runs, which Timsort merges in
    near-linear time. Re-sorting the whole window every interval cost ~10 ms of the event
    loop's GIL at 10,000 samples; this costs a fraction of that (the metrics overhead target
    is under 3% of throughput with tiny tasks).
    """

    def __init__(self, span_s: float = LATENCY_WINDOW_S, max_samples: int = LATENCY_MAX_SAMPLES) -> None:
        if span_s <= 0:
            raise ValueError("span_s must be > 0")
        if max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        self.span_s = span_s
        self.max_samples = max_samples
        self._batches: deque[_Batch] = deque()
        self._count = 0

    def extend(self, completions: Iterable[Completion]) -> None:
        items = sorted(completions, key=attrgetter("at"))
        if not items:
            return
        self._batches.append(_Batch(items))
        self._count += len(items)
        excess = self._count - self.max_samples
        while excess > 0:
            oldest = self._batches[0]
            if len(oldest.items) <= excess:
                self._batches.popleft()
                self._count -= len(oldest.items)
                excess -= len(oldest.items)
            else:
                self._batches[0] = _Batch(oldest.items[excess:])
                self._count -= excess
                excess = 0

    def __len__(self) -> int:
        return self._count

    def prune(self, now: float) -> None:
        horizon = now - self.span_s
        while self._batches and self._batches[0].oldest < horizon:
            oldest = self._batches.popleft()
            self._count -= len(oldest.items)
            if oldest.newest >= horizon:  # straddles the horizon: keep its recent part
                kept = [c for c in oldest.items if c.at >= horizon]
                self._batches.appendleft(_Batch(kept))
                self._count += len(kept)
                break

    def stats(self, now: float, max_names: int = MAX_TASK_NAMES) -> tuple[LatencyStats, dict[str, LatencyStats]]:
        """Overall and per-task-name statistics (the ``max_names`` most frequent names)."""
        self.prune(now)
        parts: dict[str, list[_Values]] = {}
        for batch in self._batches:
            for name, values in batch.by_name.items():
                parts.setdefault(name, []).append(values)
        merged = {name: _Values.merged(values) for name, values in parts.items()}
        overall = LatencyStats(
            count=self._count,
            wait=percentiles(chain.from_iterable(m.waits for m in merged.values())),
            run=percentiles(chain.from_iterable(m.runs for m in merged.values())),
        )
        busiest = sorted(merged.items(), key=lambda kv: (-kv[1].completions, kv[0]))[:max_names]
        return overall, {
            name: LatencyStats(count=m.completions, wait=_percentiles_sorted(m.waits), run=_percentiles_sorted(m.runs))
            for name, m in sorted(busiest)
        }


def _percentiles_sorted(ordered: Sequence[float]) -> Percentiles | None:
    if not ordered:
        return None
    return Percentiles(*(percentile(ordered, q) for q in PERCENTILES))


class Aggregator:
    """Turns successive readings into snapshots: rates and utilization need the previous one.

    Owned by one thread (the sampler); pure otherwise.
    """

    def __init__(self, interval: float, window: LatencyWindow | None = None) -> None:
        self.interval = interval
        self.window = window or LatencyWindow()
        self._seq = 0
        self._previous: PoolReading | None = None
        self._busy_before: dict[int, tuple[float, float]] = {}
        self.runtime = Histogram(2)  # (task name, queue)
        self.queue_wait = Histogram(2)  # (task name, queue): publish -> start
        self.pool_wait = Histogram(0)  # received by the pool -> start

    def aggregate(
        self,
        reading: PoolReading,
        processes: Mapping[int, ProcessReading] | None = None,
        host: HostReading | None = None,
        broker_backlog: int | None = None,
    ) -> Snapshot:
        processes = processes or {}
        self._seq += 1
        self.window.extend(reading.completions)
        overall, by_task = self.window.stats(reading.at)
        for done in reading.completions:
            if done.run_s is not None:
                self.runtime.observe((done.task_name, done.queue), done.run_s)
            if done.queue_wait_s is not None:
                self.queue_wait.observe((done.task_name, done.queue), done.queue_wait_s)
            if done.wait_s is not None:
                self.pool_wait.observe((), done.wait_s)

        children: list[ChildMetrics] = []
        seen: dict[int, tuple[float, float]] = {}
        for child in reading.children:
            before = self._busy_before.get(child.child_id)
            if before is None:  # first sight: its whole life so far is the span
                before = (child.created_at, 0.0)
            util = utilization(child.busy_total_s, reading.at, before[1], before[0])
            seen[child.child_id] = (reading.at, child.busy_total_s)
            proc = processes.get(child.pid, ProcessReading())
            children.append(
                ChildMetrics(
                    pid=child.pid, slot=child.slot, cpu=child.cpu, state=child.state,
                    tasks_done=child.tasks_done, utilization=util, cpu_percent=proc.cpu_percent,
                    rss_bytes=proc.rss_bytes, local_queue=child.local_queue, steals=child.steals,
                    task_name=child.task_name, task_running_s=child.task_running_s,
                    uss_bytes=child.uss_bytes, pss_bytes=child.pss_bytes,
                )
            )
        self._busy_before = seen

        previous = self._previous
        arrivals = completions = None
        if previous is not None:
            span = reading.at - previous.at
            arrivals = rate(reading.counters.get("received", 0), previous.counters.get("received", 0), span)
            completions = rate(reading.completed, previous.completed, span)
        self._previous = reading

        utils = [c.utilization for c in children if c.utilization is not None]
        cpus = [c.cpu_percent for c in children if c.cpu_percent is not None]
        rss = [c.rss_bytes for c in children if c.rss_bytes is not None]
        states: dict[str, int] = {}
        for child in reading.children:
            states[child.state] = states.get(child.state, 0) + 1
        tasks = {k: int(reading.counters.get(k, 0)) for k in ("received", "started", "succeeded", "failed", "lost")}
        tasks["completed"] = reading.completed
        return Snapshot(
            seq=self._seq,
            hostname=reading.hostname,
            taken_at=reading.wall,
            interval=self.interval,
            children_current=len(reading.children),
            target=reading.target,
            min_children=reading.min_children,
            max_children=reading.max_children,
            states=states,
            tasks=tasks,
            counters=dict(reading.counters),
            scheduler=dict(reading.scheduler),
            queued=reading.queued,
            in_flight=reading.in_flight,
            arrivals_per_s=arrivals,
            completions_per_s=completions,
            utilization=sum(utils) / len(utils) if utils else None,
            cpu_percent=sum(cpus) if cpus else None,
            rss_bytes=sum(rss) if rss else None,
            broker_backlog=broker_backlog if broker_backlog is not None else reading.broker_backlog,
            latency_window_s=self.window.span_s,
            latency=overall,
            latency_by_task=by_task,
            children=tuple(children),
            host=host or HostReading(),
            autoscaler=reading.autoscaler,
            memory=reading.memory,
            decisions=dict(reading.decisions),
            histograms={
                "runtime": self.runtime.series(),
                "queue_wait": self.queue_wait.series(),
                "pool_wait": self.pool_wait.series(),
            },
        )


def describe_autoscaler(state: Any, now: float) -> dict[str, Any] | None:
    """The autoscaler's forecast and decisions as plain data, or None when there is none.

    ``state`` is the pool's autoscaler (or any object or mapping) with optional entries
    ``last_forecast``, ``last_decision`` (the latest tick, often "hold") and ``last_change``
    (the latest resize), each a dataclass or mapping. Monotonic ``at`` times become ``age_s``;
    values that are not plain JSON are dropped. Nothing is filled in for what is missing.
    """
    if state is None:
        return None

    def get(name: str) -> Any:
        if isinstance(state, Mapping):
            return state.get(name)
        return getattr(state, name, None)

    out: dict[str, Any] = {}
    for key, names in (
        ("forecast", ("forecast", "last_forecast")),
        ("decision", ("decision", "last_decision")),
        ("change", ("change", "last_change")),
    ):
        value = next((v for v in map(get, names) if v is not None), None)
        plain = _plain(value, now)
        if plain:
            out[key] = plain
    return out or None


def _plain(value: Any, now: float) -> dict[str, Any] | None:
    if value is None:
        return None
    items: Iterable[tuple[Any, Any]]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = dataclasses.asdict(value).items()
    elif isinstance(value, Mapping):
        items = value.items()
    else:
        return None
    out: dict[str, Any] = {}
    for key, item in items:
        if key == "at" and isinstance(item, (int, float)):
            out["age_s"] = max(0.0, now - float(item))
        elif isinstance(item, (str, int, float, bool)):
            if isinstance(item, float) and not math.isfinite(item):
                continue
            out[str(key)] = item
    return out
