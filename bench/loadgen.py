"""Open-loop sending of a schedule, and collection of the results it produced.

The sender keeps to the schedule whatever the worker does: it never waits for a result, and if it
falls behind it sends at once and records the lag (reported, so a saturated sender is visible).
Results are read straight from the Redis result backend (``celery-task-meta-<id>`` keys) in
batches, which costs the worker nothing and needs no result consumer per task.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from bench.workloads import Workload

Say = Callable[[str], None]
PROGRESS_EVERY_S = 5.0
_RESULT_KEY = "celery-task-meta-"
_BATCH = 500


@dataclass(frozen=True)
class Sent:
    task_id: str
    cls: str
    scheduled: float  # offset in the schedule
    sent_at: float  # time.time() just before publishing
    lag_s: float  # how late against the schedule


def make_client(broker_url: str) -> Celery:
    """A sender/control app of its own: fresh connections after the harness flushes Redis."""
    client = Celery("bench-client", broker=broker_url, set_as_current=False)
    client.conf.update(task_serializer="json", accept_content=["json"],
                       broker_connection_retry_on_startup=True)
    return client


def send_schedule(client: Celery, workload: Workload, say: Say) -> list[Sent]:
    sent: list[Sent] = []
    start_mono = time.monotonic()
    last_report = start_mono
    total = len(workload.arrivals)
    with client.producer_or_acquire() as producer:
        for arrival in workload.arrivals:
            delay = start_mono + arrival.at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            task_id = uuid.uuid4().hex
            now_mono, sent_at = time.monotonic(), time.time()
            client.send_task(arrival.task, args=arrival.args, task_id=task_id,
                             headers=arrival.headers, producer=producer)
            sent.append(Sent(task_id, arrival.cls, arrival.at, sent_at,
                             max(0.0, now_mono - start_mono - arrival.at)))
            if now_mono - last_report >= PROGRESS_EVERY_S:
                last_report = now_mono
                say(f"    sending: {len(sent)}/{total} at t={now_mono - start_mono:.0f}s")
    # Keep the measured window at least as long as the schedule (idle tails, e.g. io_spiky).
    remaining = start_mono + workload.duration_s - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
    return sent


def collect(backend_url: str, sent: list[Sent], timeout_s: float, say: Say,
            poll_s: float = 0.1) -> dict[str, dict[str, Any]]:
    """Results by task id; ids missing when ``timeout_s`` runs out are the lost tasks."""
    pending = [s.task_id for s in sent]
    found: dict[str, dict[str, Any]] = {}
    client = redis.Redis.from_url(backend_url)
    start = time.monotonic()
    deadline = start + timeout_s
    last_report = start
    try:
        for _ in range(int(timeout_s / poll_s) + 2):
            still: list[str] = []
            for i in range(0, len(pending), _BATCH):
                batch = pending[i:i + _BATCH]
                raws = client.mget([_RESULT_KEY + t for t in batch])
                for task_id, raw in zip(batch, raws, strict=True):
                    if raw is None:
                        still.append(task_id)
                    else:
                        found[task_id] = json.loads(raw)
            pending = still
            now = time.monotonic()
            if not pending or now >= deadline:
                break
            if now - last_report >= PROGRESS_EVERY_S:
                last_report = now
                say(f"    draining: {len(found)}/{len(sent)} done")
            time.sleep(poll_s)
    finally:
        client.close()
    return found
