"""Optional Prometheus exposition of the latest snapshot (extra: ``celery-adaptive[prometheus]``).

Off unless ``adaptive_metrics_prometheus_port`` is set. prometheus-client's HTTP server runs
in its own thread and, at each scrape, a collector turns the service's latest `Snapshot` (an
immutable object) into samples; nothing is recomputed and the event loop is not involved.
Values that were not measured have no sample. Every metric carries the label ``worker``
(the Celery hostname); one port per worker process.

Metrics (gauges unless marked counter):

=============================================  =====================  ==========================
name                                           labels                 meaning
=============================================  =====================  ==========================
celery_adaptive_children                       state                  children by state
celery_adaptive_children_target                                       target number of children
celery_adaptive_children_min / _max                                   autoscaler bounds
celery_adaptive_tasks_total (counter)          outcome                received, started,
                                                                      succeeded, failed, lost
celery_adaptive_queued                                                in the pool, not started
celery_adaptive_in_flight                                             handed to a child
celery_adaptive_utilization                                           mean busy fraction (0-1)
celery_adaptive_arrival_rate                                          tasks/s received
celery_adaptive_completion_rate                                       tasks/s finished
celery_adaptive_broker_backlog                                        messages in the broker
celery_adaptive_queue_wait_seconds             quantile               over the sliding window
celery_adaptive_run_seconds                    quantile               over the sliding window
celery_adaptive_task_queue_wait_seconds        task, quantile         per task name
celery_adaptive_task_run_seconds               task, quantile         per task name
celery_adaptive_child_cpu_percent              pid, cpu               psutil, 100 = one core
celery_adaptive_child_rss_bytes                pid
celery_adaptive_child_utilization              pid                    busy fraction (0-1)
celery_adaptive_child_tasks_total (counter)    pid                    tasks done by the child
celery_adaptive_host_cpu_percent                                      whole host
celery_adaptive_host_load_average              period (1m, 5m, 15m)
celery_adaptive_host_memory_percent
celery_adaptive_child_uss_bytes                pid                    unique memory (watcher)
celery_adaptive_child_pss_bytes                pid                    proportional set size
celery_adaptive_memory_used_bytes                                     container (or host) memory
                                                                      in use, as admission reads it
celery_adaptive_memory_limit_bytes                                    its limit
celery_adaptive_memory_admission_threshold_bytes                      no task starts above it
celery_adaptive_memory_admission_paused                               1 while paused
celery_adaptive_memory_admission_pauses_total  (counter)              pauses since start
celery_adaptive_memory_paused_seconds_total    (counter)              time paused
celery_adaptive_memory_held                                           heavy tasks held until
                                                                      they fit
celery_adaptive_memory_limit_hits_total        limit (soft, hard)     children over a limit
  (counter)
celery_adaptive_memory_stopped_tasks_total                            tasks failed with
  (counter)                                                           MemoryLimitExceeded
celery_adaptive_task_memory_growth_bytes       task                   learnt peak RSS growth
celery_adaptive_autoscaler_predicted_rate                             forecast tasks/s
celery_adaptive_snapshot_timestamp_seconds                            when it was measured
=============================================  =====================  ==========================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from celery_adaptive.metrics.snapshot import LatencyStats, Snapshot

logger = logging.getLogger("celery_adaptive.metrics")

PREFIX = "celery_adaptive"
QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))


def families(snapshot: Snapshot) -> list[Any]:
    """The metric families for one snapshot (pure apart from prometheus-client's classes)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    worker = snapshot.hostname
    out: list[Any] = []

    def gauge(name: str, doc: str, value: float | None, **labels: str) -> None:
        if value is None:
            return
        family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["worker", *labels])
        family.add_metric([worker, *labels.values()], float(value))
        out.append(family)

    def gauge_family(name: str, doc: str, labels: list[str]) -> Any:
        family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["worker", *labels])
        out.append(family)
        return family

    def counter_family(name: str, doc: str, labels: list[str]) -> Any:
        family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["worker", *labels])
        out.append(family)
        return family

    children = gauge_family("children", "Pool children by state.", ["state"])
    for state, count in sorted(snapshot.states.items()):
        children.add_metric([worker, state], count)
    gauge("children_target", "Target number of children.", snapshot.target)
    gauge("children_min", "Lower bound on children.", snapshot.min_children)
    gauge("children_max", "Upper bound on children.", snapshot.max_children)
    tasks = counter_family("tasks", "Tasks by outcome since the worker started.", ["outcome"])
    for outcome in ("received", "started", "succeeded", "failed", "lost"):
        tasks.add_metric([worker, outcome], snapshot.tasks.get(outcome, 0))
    gauge("queued", "Tasks in the pool not yet handed to a child.", snapshot.queued)
    gauge("in_flight", "Tasks handed to a child.", snapshot.in_flight)
    gauge("utilization", "Mean busy fraction of the children over the interval.", snapshot.utilization)
    gauge("arrival_rate", "Tasks received per second over the interval.", snapshot.arrivals_per_s)
    gauge("completion_rate", "Tasks finished per second over the interval.", snapshot.completions_per_s)
    gauge("broker_backlog", "Messages waiting in the broker queues.", snapshot.broker_backlog)

    def quantiles(name: str, doc: str, per_task: Mapping[str, LatencyStats] | None,
                  overall: LatencyStats | None, kind: str) -> None:
        labels = ["task", "quantile"] if per_task is not None else ["quantile"]
        family = gauge_family(name, doc, labels)
        items = per_task.items() if per_task is not None else [("", overall)]
        for task, stats in items:
            values = getattr(stats, kind) if stats is not None else None
            if values is None:
                continue
            for quantile, attr in QUANTILES:
                family.add_metric([worker, *([task] if per_task is not None else []), quantile],
                                  getattr(values, attr))

    window = f" over the last {snapshot.latency_window_s:.0f} s"
    quantiles("queue_wait_seconds", "Queue wait" + window, None, snapshot.latency, "wait")
    quantiles("run_seconds", "Run time" + window, None, snapshot.latency, "run")
    quantiles("task_queue_wait_seconds", "Queue wait per task" + window, snapshot.latency_by_task, None, "wait")
    quantiles("task_run_seconds", "Run time per task" + window, snapshot.latency_by_task, None, "run")

    cpu = gauge_family("child_cpu_percent", "CPU percent of each child (100 = one core).", ["pid", "cpu"])
    rss = gauge_family("child_rss_bytes", "Resident memory of each child.", ["pid"])
    util = gauge_family("child_utilization", "Busy fraction of each child over the interval.", ["pid"])
    done = counter_family("child_tasks", "Tasks done by each child.", ["pid"])
    uss = gauge_family("child_uss_bytes", "Unique memory of each child (what its exit frees).", ["pid"])
    pss = gauge_family("child_pss_bytes", "Proportional set size of each child.", ["pid"])
    for child in snapshot.children:
        pid = str(child.pid)
        if child.uss_bytes is not None:
            uss.add_metric([worker, pid], child.uss_bytes)
        if child.pss_bytes is not None:
            pss.add_metric([worker, pid], child.pss_bytes)
        if child.cpu_percent is not None:
            cpu.add_metric([worker, pid, "" if child.cpu is None else str(child.cpu)], child.cpu_percent)
        if child.rss_bytes is not None:
            rss.add_metric([worker, pid], child.rss_bytes)
        if child.utilization is not None:
            util.add_metric([worker, pid], child.utilization)
        done.add_metric([worker, pid], child.tasks_done)

    host = snapshot.host
    gauge("host_cpu_percent", "CPU percent of the whole host.", host.cpu_percent)
    gauge("host_memory_percent", "Memory in use on the host, percent.", host.memory_percent)
    if host.load_average is not None:
        load = gauge_family("host_load_average", "Host load average.", ["period"])
        for period, value in zip(("1m", "5m", "15m"), host.load_average, strict=True):
            load.add_metric([worker, period], value)
    _memory_families(snapshot, gauge, gauge_family, counter_family)
    forecast = (snapshot.autoscaler or {}).get("forecast")
    if isinstance(forecast, Mapping):
        gauge("autoscaler_predicted_rate", "The autoscaler's forecast, tasks/s.", forecast.get("predicted_rate"))
    gauge("snapshot_timestamp_seconds", "When the snapshot was measured (epoch).", snapshot.taken_at)
    return out


def _memory_families(snapshot: Snapshot, gauge: Callable[..., None], gauge_family: Callable[..., Any],
                     counter_family: Callable[..., Any]) -> None:
    """The memory guard's figures (only when its watcher runs)."""
    memory = snapshot.memory
    if not memory:
        return
    worker = snapshot.hostname
    gauge("memory_used_bytes", "Memory in use of the container's cgroup (or the host), as admission reads it.",
          memory.get("used_bytes"))
    gauge("memory_limit_bytes", "The container's memory limit (or the host's memory).", memory.get("limit_bytes"))
    gauge("memory_admission_threshold_bytes", "Memory in use above which no task starts.",
          memory.get("threshold_bytes"))
    gauge("memory_admission_paused", "1 while no task starts because memory is over the threshold.",
          1 if memory.get("admission") == "paused" else 0)
    gauge("memory_held", "Heavy tasks held in the pool until their memory fits.", memory.get("held"))
    pauses = counter_family("memory_admission_pauses", "Admission pauses since the worker started.", [])
    pauses.add_metric([worker], memory.get("pauses", 0))
    paused = counter_family("memory_paused_seconds", "Seconds admission was paused since the worker started.", [])
    paused.add_metric([worker], memory.get("paused_s", 0.0))
    hits = counter_family("memory_limit_hits", "Children found over a memory limit.", ["limit"])
    for limit in ("soft", "hard"):
        hits.add_metric([worker, limit], snapshot.counters.get(f"memory_{limit}_limit", 0))
    stopped = counter_family("memory_stopped_tasks", "Tasks failed with MemoryLimitExceeded.", [])
    stopped.add_metric([worker], snapshot.counters.get("memory_stopped_tasks", 0))
    growth = gauge_family("task_memory_growth_bytes", "Learnt peak RSS growth per task name.", ["task"])
    tasks = memory.get("tasks")
    if isinstance(tasks, Mapping):
        for task, value in sorted(tasks.items()):
            growth.add_metric([worker, str(task)], float(value))


class _Collector:
    def __init__(self, source: Callable[[], Snapshot | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Any]:
        snapshot = self._source()
        if snapshot is not None:
            yield from families(snapshot)


class PrometheusExporter:
    """An HTTP endpoint (``/metrics``) serving the latest snapshot."""

    def __init__(self, source: Callable[[], Snapshot | None], port: int, address: str = "0.0.0.0") -> None:
        self.source = source
        self.port = port
        self.address = address
        self._server: Any = None

    def start(self) -> bool:
        """Start serving; False (with an error logged) when it cannot. Never raises."""
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            logger.error(
                "adaptive_metrics_prometheus_port is set but prometheus-client is not installed "
                "(pip install 'celery-adaptive[prometheus]'); no Prometheus endpoint"
            )
            return False
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self.source))
        try:
            self._server, _thread = start_http_server(self.port, self.address, registry)
        except OSError as exc:
            logger.error("Cannot serve Prometheus metrics on %s:%s (%s)", self.address, self.port, exc)
            return False
        logger.info("Prometheus metrics on http://%s:%s/metrics", self.address, self.port)
        return True

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
