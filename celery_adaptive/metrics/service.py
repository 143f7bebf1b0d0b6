"""The metrics service: the one object the pool adapter holds. Wires readings, sampling,
aggregation, the event and the Redis publisher together.

Threads and data flow::

    event-loop thread (L)               sampler thread                publisher thread
    ─────────────────────               ──────────────                ────────────────
    on_job_done ─> completions
    tick (supervisor timer, re-armed)
      read supervisor ─> PoolReading ─> queue(4) ─> psutil by pid,
                                                    broker LLEN,
                                                    Aggregator
                                                      │ Snapshot
                                                      ├─> offer ─> deque(64) ─> Redis
    emit(snapshot) <─ supervisor.call_later(0) ───────┘ (latest kept for summary())
      consumer.event_dispatcher.send(...)

The supervisor's timers run on the event-loop thread (or, before a hub is attached, under the
supervisor's lock), so the reading and the event both happen where Celery's state lives; the
threads only see immutable readings and snapshots. A full queue drops the reading: metrics
never slow the pool down.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from celery_adaptive.metrics.events import send_metrics_event
from celery_adaptive.metrics.publisher import RedisPublisher
from celery_adaptive.metrics.sampler import BrokerBacklog, HostSampler, ProcessSampler
from celery_adaptive.metrics.snapshot import (
    LATENCY_MAX_SAMPLES,
    Aggregator,
    ChildReading,
    Completion,
    PoolReading,
    Snapshot,
    describe_autoscaler,
)
from celery_adaptive.supervisor import ChildState

logger = logging.getLogger("celery_adaptive.metrics")

#: How long `stop` waits for the sampler and publisher threads (it may run in a signal handler).
STOP_TIMEOUT = 1.0


class MetricsService:
    def __init__(
        self,
        supervisor: Any,
        *,
        hostname: str,
        interval: float,
        publisher: RedisPublisher | None = None,
        broker_backlog: BrokerBacklog | None = None,
        consumer: Callable[[], Any] = lambda: None,
        autoscaler: Callable[[], Any] = lambda: None,
    ) -> None:
        self.supervisor = supervisor
        self.hostname = hostname
        self.interval = interval
        self.publisher = publisher
        self._broker_backlog = broker_backlog
        self._consumer = consumer
        self._autoscaler = autoscaler
        self._aggregator = Aggregator(interval)
        self._processes = ProcessSampler()
        self._host = HostSampler()
        # L only:
        self._completions: deque[Completion] = deque(maxlen=LATENCY_MAX_SAMPLES)
        self._completed = 0
        self._timer: Any = None
        self.events_sent = 0
        self._event_error_logged = False
        # shared:
        self._readings: queue.Queue[PoolReading | None] = queue.Queue(maxsize=4)
        self._emit_lock = threading.Lock()
        self._stopped = False
        self._latest: Snapshot | None = None
        self._thread: threading.Thread | None = None
        self.exporter: Any = None  # a PrometheusExporter, when one is configured

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.publisher is not None:
            self.publisher.start()
        self._thread = threading.Thread(target=self._sample_loop, name="adaptive-metrics", daemon=True)
        self._thread.start()
        self._timer = self.supervisor.call_later(self.interval, self._tick, "metrics")

    def stop(self) -> None:
        """Idempotent; safe in the SIGQUIT handler (no waiting on the event loop)."""
        if self._stopped:
            return
        self._stopped = True
        # Wait for an emit in progress, so no supervisor timer is added after this returns. With
        # a timeout: in a signal handler, L may have been interrupted inside the timer heap's
        # lock, which that emit could be waiting for.
        if self._emit_lock.acquire(timeout=0.5):
            self._emit_lock.release()
        if self._timer is not None:
            self._timer.cancel()
        try:
            self._readings.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT)
        if self.publisher is not None:
            self.publisher.stop(STOP_TIMEOUT)
        if self._broker_backlog is not None:
            self._broker_backlog.close()
        if self.exporter is not None:
            self.exporter.stop()

    # ------------------------------------------------------------------ L
    def on_job_done(self, job: Any, runtime: float | None) -> None:
        """Supervisor hook, once per reported job: record its name and times only."""
        accepted = job.accepted_at
        wait = max(0.0, accepted - job.submitted_at) if accepted is not None else None
        before = job.publish_wait
        queue_wait = before + wait if before is not None and wait is not None else None
        self._completions.append(
            Completion(self.supervisor.clock.now(), job.task_name, wait, runtime, job.queue or "", queue_wait)
        )
        self._completed += 1

    def summary(self) -> dict[str, Any]:
        """For ``inspect stats`` (the pool's ``metrics`` key)."""
        latest = self._latest
        out: dict[str, Any] = latest.summary() if latest is not None else {"interval": self.interval}
        out["events_sent"] = self.events_sent
        out["redis"] = self.publisher.status() if self.publisher is not None else {"redis": "off"}
        return out

    @property
    def latest(self) -> Snapshot | None:
        return self._latest

    def _tick(self) -> None:
        if self._stopped:
            return
        self._timer = self.supervisor.call_later(self.interval, self._tick, "metrics")
        try:
            reading = self._read()
        except Exception:
            logger.exception("Reading pool metrics failed")
            return
        try:
            self._readings.put_nowait(reading)
        except queue.Full:
            logger.debug("metrics sampler is behind; dropped a reading")

    def _read(self) -> PoolReading:
        sup = self.supervisor
        now = sup.clock.now()
        scheduler = sup.scheduler
        depths = scheduler.queue_depths()
        steals = scheduler.steals_by_child()
        running_jobs = sup.running_jobs()  # on L: the running job of each child
        memory = getattr(sup, "memory", None)
        readings = memory.readings if memory is not None else {}
        children: list[ChildReading] = []
        for child in sup.children():
            if child.state is ChildState.DEAD:
                continue
            busy = child.busy_seconds + (now - child.busy_since if child.busy_since is not None else 0.0)
            task_name: str | None = None
            running: float | None = None
            job = running_jobs.get(child.child_id)
            if job is not None and job.accepted_at is not None:
                task_name, running = job.task_name, max(0.0, now - job.accepted_at)
            measured = readings.get(child.child_id)
            children.append(
                ChildReading(
                    child_id=child.child_id, pid=child.pid, slot=child.slot, cpu=child.cpu,
                    state=child.state.value, created_at=child.created_at,
                    tasks_done=child.tasks_done, busy_total_s=busy,
                    local_queue=depths.get(child.child_id, 0), steals=steals.get(child.child_id, 0),
                    task_name=task_name, task_running_s=running,
                    uss_bytes=measured.uss if measured is not None else None,
                    pss_bytes=measured.pss if measured is not None else None,
                )
            )
        counters = scheduler.counters()
        completions = tuple(self._completions)
        self._completions.clear()
        settings = sup.settings
        scaler = self._autoscaler()
        low, high = getattr(scaler, "bounds", None) or (settings.min_children, settings.max_children)
        probe = getattr(scaler, "probe", None)
        return PoolReading(
            at=now,
            wall=time.time(),
            hostname=self.hostname,
            target=sup.target,
            min_children=low,
            max_children=high,
            counters=dict(sup.counters),
            scheduler={
                "local_hits": counters.local_hits, "steals": counters.steals,
                "reservations": counters.reservations, "keyed": counters.keyed,
                "requeued": counters.requeued,
            },
            queued=scheduler.queued_count(),
            in_flight=scheduler.in_flight_count(),
            completed=self._completed,
            children=tuple(children),
            completions=completions,
            autoscaler=describe_autoscaler(scaler, now),
            broker_queues=self._queue_names() if self._broker_backlog is not None else (),
            broker_backlog=getattr(probe, "value", None),
            memory=memory.describe(now) if memory is not None else None,
            decisions=dict(getattr(scaler, "decision_counts", None) or {}),
        )

    def _queue_names(self) -> tuple[str, ...]:
        task_consumer = getattr(self._consumer(), "task_consumer", None)
        queues = getattr(task_consumer, "queues", None) or ()
        return tuple(sorted({q.name for q in queues if getattr(q, "name", None)}))

    def _emit(self, snapshot: Snapshot) -> None:
        if self._stopped:
            return
        try:
            if send_metrics_event(self._consumer(), snapshot):
                self.events_sent += 1
        except Exception as exc:
            # The event connection is Celery's; it reconnects. Say so once, not every interval.
            if not self._event_error_logged:
                self._event_error_logged = True
                logger.warning("Could not send the metrics event (%s); will keep trying", exc)
            return
        self._event_error_logged = False

    # ------------------------------------------------------------------ sampler thread
    def _sample_loop(self) -> None:
        while True:
            reading = self._readings.get()
            if reading is None or self._stopped:
                return
            try:
                snapshot = self._sample(reading)
            except Exception:
                logger.exception("Sampling pool metrics failed")
                continue
            self._latest = snapshot
            with self._emit_lock:
                if self._stopped:
                    return
                self.supervisor.call_later(0.0, lambda s=snapshot: self._emit(s), "metrics-event")
            if self.publisher is not None:
                self.publisher.offer(snapshot.to_dict(), snapshot.to_history())

    def _sample(self, reading: PoolReading) -> Snapshot:
        processes = self._processes.sample(c.pid for c in reading.children)
        host = self._host.sample()
        backlog = None
        if reading.broker_backlog is None and self._broker_backlog is not None:
            backlog = self._broker_backlog.sample(reading.broker_queues)
        return self._aggregator.aggregate(reading, processes, host, backlog)
