"""Optional Prometheus exposition of the latest snapshot (extra: ``celery-adaptive[prometheus]``).

Off unless ``adaptive_metrics_prometheus_port`` is set; it listens on
``adaptive_metrics_prometheus_address``, **127.0.0.1 by default**: the endpoint has no
authentication and shows host and task names, memory and scaling decisions, so binding it to
another interface is a decision for the operator (a pod IP for Prometheus' Kubernetes
discovery, behind a NetworkPolicy). prometheus-client's HTTP server runs in its own thread
and, at each scrape, a collector turns the service's latest `Snapshot` (immutable) into
samples; nothing is recomputed and the event loop is not involved. Values that were not
measured have no sample.

Names follow Prometheus' conventions (base units, ``_total`` counters, ``_seconds``,
``_bytes``, ``_ratio``; promtool's lint passes) and celery-exporter's labels: ``hostname`` (the
Celery node name) on every metric, ``name`` (task name) and ``queue_name`` (the message's
routing key, i.e. its queue under default routing) on task histograms. The prefix
``celery_adaptive_`` keeps them apart from celery-exporter's ``celery_*`` series, which come
from events and can run alongside. Cardinality is bounded: children are labelled by ``slot``
(0..max children + lanes; a replacement child takes a free slot, a pid never appears), task
histograms keep at most 50 (name, queue) pairs (the rest count as ``other``), and the
autoscaler's decisions are labelled by ``direction`` and ``cause`` (fixed sets).

=====================================================  ==========  =========================
metric                                                  labels      meaning
=====================================================  ==========  =========================
celery_adaptive_pool_processes                          state       children by state
celery_adaptive_pool_target_processes                               children the pool aims at
celery_adaptive_pool_min_processes / _max_processes                 autoscaler bounds
celery_adaptive_pool_queued_tasks                                   received, not yet started
celery_adaptive_pool_active_tasks                                   on a child
celery_adaptive_pool_utilization_ratio                              mean busy fraction (0-1)
celery_adaptive_broker_backlog_messages                             waiting in the broker
celery_adaptive_task_{received,started,succeeded,
  failed,lost}_total (counters)                                     tasks by outcome
celery_adaptive_task_{soft,hard}_time_limit_total                   time limits hit
celery_adaptive_task_revoked_before_start_total                     revoked while queued
celery_adaptive_task_runtime_seconds (histogram)        name,       run time in a child
                                                        queue_name
celery_adaptive_task_queue_wait_seconds (histogram)     name,       publish -> start (tasks
                                                        queue_name  stamped by publish_time)
celery_adaptive_pool_wait_seconds (histogram)                       pool receives -> start
celery_adaptive_process_utilization_ratio               slot        busy fraction of a child
celery_adaptive_process_cpu_usage_ratio                 slot        CPU of a child, 1 = a core
celery_adaptive_process_resident_memory_bytes           slot        RSS of a child
celery_adaptive_process_tasks_total (counter)           slot        tasks done by the child in
                                                                    the slot (resets when it
                                                                    is replaced)
celery_adaptive_process_{started,exited,crashed}_total              children started, exited,
                                                                    died abnormally
celery_adaptive_process_protocol_errors_total                       children replaced for a
                                                                    bad message
celery_adaptive_autoscaler_observed_arrivals_per_second             measured arrival rate
celery_adaptive_autoscaler_forecast_arrivals_per_second             rate it sizes for
celery_adaptive_autoscaler_service_time_seconds                     mean task time it uses
celery_adaptive_autoscaler_backlog_tasks                            pool queue + broker queue
celery_adaptive_autoscaler_desired_processes                        what the forecast asks for
celery_adaptive_autoscaler_decisions_total (counter)    direction,  decisions since start
                                                        cause
celery_adaptive_process_unique_memory_bytes             slot        USS of a child, what its
                                                                    exit frees (memory guard)
celery_adaptive_process_proportional_memory_bytes       slot        PSS of a child
celery_adaptive_memory_used_bytes                                   container (or host) memory
                                                                    in use, as admission reads
celery_adaptive_memory_limit_bytes                                  its limit
celery_adaptive_memory_admission_threshold_bytes                    no task starts above it
celery_adaptive_memory_admission_paused                             1 while admission is paused
celery_adaptive_memory_admission_pauses_total                       pauses since start
celery_adaptive_memory_admission_paused_seconds_total               time paused since start
celery_adaptive_memory_held_tasks                                   heavy tasks held in the
                                                                    pool until they fit
celery_adaptive_memory_limit_hits_total (counter)       limit       children over a limit
                                                                    (soft, hard)
celery_adaptive_memory_stopped_tasks_total                          tasks failed with
                                                                    MemoryLimitExceeded
celery_adaptive_task_memory_growth_bytes                name        learnt peak RSS growth
celery_adaptive_last_snapshot_timestamp_seconds                     when it was measured
=====================================================  ==========  =========================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from celery_adaptive.metrics.histograms import BUCKETS
from celery_adaptive.metrics.snapshot import Snapshot

logger = logging.getLogger("celery_adaptive.metrics")

PREFIX = "celery_adaptive"
DEFAULT_ADDRESS = "127.0.0.1"

#: (metric suffix, supervisor counter, help) for the task outcome counters.
TASK_COUNTERS = (
    ("task_received_total", "received", "Tasks the pool received."),
    ("task_started_total", "started", "Tasks a child started."),
    ("task_succeeded_total", "succeeded", "Tasks that succeeded."),
    ("task_failed_total", "failed", "Tasks that failed (raised, time limit, lost)."),
    ("task_lost_total", "lost", "Tasks whose child died under them (WorkerLostError)."),
    ("task_soft_time_limit_total", "soft_timeouts", "Soft time limits signalled."),
    ("task_hard_time_limit_total", "hard_timeouts", "Hard time limits: the child was killed."),
    ("task_revoked_before_start_total", "revoked_before_start", "Tasks revoked while queued in the pool."),
    ("process_started_total", "children_started", "Children started."),
    ("process_exited_total", "children_exited", "Children that exited (any reason)."),
    ("process_crashed_total", "children_crashed", "Children that died abnormally (signal or error exit)."),
    ("process_protocol_errors_total", "bad_messages", "Children replaced for an invalid message."),
)


def _bucket_bounds() -> list[str]:
    return [repr(float(b)) for b in BUCKETS] + ["+Inf"]


def families(snapshot: Snapshot) -> list[Any]:
    """The metric families for one snapshot (pure apart from prometheus-client's classes)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    host = snapshot.hostname
    out: list[Any] = []

    def gauge(name: str, doc: str, value: float | None) -> None:
        if value is None:
            return
        family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["hostname"])
        family.add_metric([host], float(value))
        out.append(family)

    def family(kind: Any, name: str, doc: str, labels: list[str]) -> Any:
        made = kind(f"{PREFIX}_{name}", doc, labels=["hostname", *labels])
        out.append(made)
        return made

    processes = family(GaugeMetricFamily, "pool_processes", "Pool children by state.", ["state"])
    for state, count in sorted(snapshot.states.items()):
        processes.add_metric([host, state], count)
    gauge("pool_target_processes", "Children the pool aims to run (the autoscaler's target).", snapshot.target)
    gauge("pool_min_processes", "Lower bound on children.", snapshot.min_children)
    gauge("pool_max_processes", "Upper bound on children.", snapshot.max_children)
    gauge("pool_queued_tasks", "Tasks received by the pool and not yet started.", snapshot.queued)
    gauge("pool_active_tasks", "Tasks handed to a child.", snapshot.in_flight)
    gauge("pool_utilization_ratio", "Mean busy fraction of the children over the interval.", snapshot.utilization)
    gauge("broker_backlog_messages", "Messages waiting in the broker for this worker's queues.",
          snapshot.broker_backlog)

    for suffix, key, doc in TASK_COUNTERS:
        counter = family(CounterMetricFamily, suffix[: -len("_total")], doc, [])
        counter.add_metric([host], snapshot.counters.get(key, 0))

    for key, name, doc, labels in (
        ("runtime", "task_runtime_seconds", "Run time of tasks in a child.", ["name", "queue_name"]),
        ("queue_wait", "task_queue_wait_seconds",
         "From publish to start, for tasks whose producer stamps the publish time.", ["name", "queue_name"]),
        ("pool_wait", "pool_wait_seconds", "From the pool receiving a task to a child starting it.", []),
    ):
        histogram = family(HistogramMetricFamily, name, doc, labels)
        for series in snapshot.histograms.get(key, ()):
            buckets = list(zip(_bucket_bounds(), series.cumulative, strict=True))
            histogram.add_metric([host, *series.labels], buckets, series.sum)

    util = family(GaugeMetricFamily, "process_utilization_ratio", "Busy fraction of each child over the interval.", ["slot"])
    cpu = family(GaugeMetricFamily, "process_cpu_usage_ratio", "CPU used by each child (1 = one core).", ["slot"])
    rss = family(GaugeMetricFamily, "process_resident_memory_bytes", "Resident memory of each child.", ["slot"])
    done = family(CounterMetricFamily, "process_tasks", "Tasks done by the child in each slot.", ["slot"])
    uss = family(GaugeMetricFamily, "process_unique_memory_bytes",
                 "Unique memory of each child (what its exit frees).", ["slot"])
    pss = family(GaugeMetricFamily, "process_proportional_memory_bytes",
                 "Proportional set size of each child.", ["slot"])
    for child in snapshot.children:
        slot = str(child.slot)
        if child.utilization is not None:
            util.add_metric([host, slot], child.utilization)
        if child.cpu_percent is not None:
            cpu.add_metric([host, slot], child.cpu_percent / 100.0)
        if child.rss_bytes is not None:
            rss.add_metric([host, slot], child.rss_bytes)
        done.add_metric([host, slot], child.tasks_done)
        if child.uss_bytes is not None:
            uss.add_metric([host, slot], child.uss_bytes)
        if child.pss_bytes is not None:
            pss.add_metric([host, slot], child.pss_bytes)

    scaler = snapshot.autoscaler or {}
    forecast: Mapping[str, Any] = scaler.get("forecast") or {}
    decision: Mapping[str, Any] = scaler.get("decision") or {}
    gauge("autoscaler_observed_arrivals_per_second", "Arrival rate the autoscaler measured.",
          forecast.get("arrival_rate"))
    gauge("autoscaler_forecast_arrivals_per_second", "Arrival rate the autoscaler sizes for.",
          forecast.get("predicted_rate"))
    gauge("autoscaler_service_time_seconds", "Mean task time the autoscaler sizes with.",
          forecast.get("service_time"))
    gauge("autoscaler_backlog_tasks", "Tasks waiting in the pool and the broker, as the autoscaler saw them.",
          forecast.get("backlog"))
    gauge("autoscaler_desired_processes", "Children the last forecast asked for (before stabilization).",
          decision.get("desired"))
    if snapshot.decisions:
        decisions = family(CounterMetricFamily, "autoscaler_decisions",
                           "Autoscaler decisions by direction (up, down, hold) and cause.", ["direction", "cause"])
        for (direction, cause), count in sorted(snapshot.decisions.items()):
            decisions.add_metric([host, direction, cause], count)
    _memory_families(snapshot, gauge, family)
    gauge("last_snapshot_timestamp_seconds", "When the snapshot was measured (Unix time).", snapshot.taken_at)
    return out


def _memory_families(snapshot: Snapshot, gauge: Callable[[str, str, float | None], None],
                     family: Callable[[Any, str, str, list[str]], Any]) -> None:
    """The memory guard's figures (only when its watcher runs)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    memory = snapshot.memory
    if not memory:
        return
    host = snapshot.hostname
    gauge("memory_used_bytes", "Memory in use of the container's cgroup (or the host), as admission reads it.",
          memory.get("used_bytes"))
    gauge("memory_limit_bytes", "The container's memory limit (or the host's memory).", memory.get("limit_bytes"))
    gauge("memory_admission_threshold_bytes", "Memory in use above which no task starts.",
          memory.get("threshold_bytes"))
    gauge("memory_admission_paused", "1 while no task starts because memory is over the threshold.",
          1 if memory.get("admission") == "paused" else 0)
    gauge("memory_held_tasks", "Heavy tasks held in the pool until their memory fits.", memory.get("held"))
    pauses = family(CounterMetricFamily, "memory_admission_pauses", "Admission pauses since the worker started.", [])
    pauses.add_metric([host], memory.get("pauses", 0))
    paused = family(CounterMetricFamily, "memory_admission_paused_seconds",
                    "Seconds admission was paused since the worker started.", [])
    paused.add_metric([host], memory.get("paused_s", 0.0))
    hits = family(CounterMetricFamily, "memory_limit_hits", "Children found over a memory limit (soft, hard).",
                  ["limit"])
    for limit in ("soft", "hard"):
        hits.add_metric([host, limit], snapshot.counters.get(f"memory_{limit}_limit", 0))
    stopped = family(CounterMetricFamily, "memory_stopped_tasks", "Tasks failed with MemoryLimitExceeded.", [])
    stopped.add_metric([host], snapshot.counters.get("memory_stopped_tasks", 0))
    growth = family(GaugeMetricFamily, "task_memory_growth_bytes", "Learnt peak RSS growth per task name.",
                    ["name"])
    tasks = memory.get("tasks")
    if isinstance(tasks, Mapping):
        for task, value in sorted(tasks.items()):
            growth.add_metric([host, str(task)], float(value))


class _Collector:
    def __init__(self, source: Callable[[], Snapshot | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Any]:
        snapshot = self._source()
        if snapshot is not None:
            yield from families(snapshot)


class PrometheusExporter:
    """An HTTP endpoint (``/metrics``) serving the latest snapshot."""

    def __init__(self, source: Callable[[], Snapshot | None], port: int, address: str = DEFAULT_ADDRESS) -> None:
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
        if self.address not in ("127.0.0.1", "::1", "localhost"):
            logger.warning(
                "Prometheus metrics on http://%s:%s/metrics without authentication: host and task "
                "names, memory and scaling decisions are readable by anyone who can reach it",
                self.address, self.port,
            )
        else:
            logger.info("Prometheus metrics on http://%s:%s/metrics", self.address, self.port)
        return True

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
