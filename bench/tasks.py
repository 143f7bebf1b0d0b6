"""The tasks the benchmark workers run (``celery -A bench.tasks worker``).

The worker subprocess learns its broker and result backend from the environment, set by
bench/worker.py; importing this module connects to nothing. Every task returns its finish time
(``time.time()``, same host as the sender, so comparable with the send time) plus the pid that
ran it, so latency is measured end to end without trusting any Celery event.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from typing import Any

from celery import Celery

BROKER_ENV = "BENCH_BROKER_URL"
BACKEND_ENV = "BENCH_RESULT_BACKEND"

# Spinning is bounded by wall time too, so a starved thread (GIL, overloaded host) still ends.
_MAX_SPIN_WALL_FACTOR = 200.0
_MAX_SPIN_WALL_EXTRA_S = 30.0

# Affinity workload: the first task for a tenant in a process pays the warm-up. Module-level on
# purpose: it is per process, exactly what a pool that routes by affinity can exploit.
WARMUP_MS = 50.0
WARM_MS = 2.0
# A process keeps this many tenants warm (least recently used goes first), as a real cache of
# per-tenant state would: what one process can hold is bounded, so placement decides hits.
TENANT_CACHE = 16
_warm_tenants: OrderedDict[str, None] = OrderedDict()

app = Celery("bench.tasks")
app.conf.update(
    broker_url=os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/0"),
    result_backend=os.environ.get(BACKEND_ENV, "redis://127.0.0.1:6379/1"),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # The harness reads results straight from Redis; a day of expiry is irrelevant (db flushed).
    result_expires=3600,
    # The adaptive-nometrics configuration turns the pool's metrics off to measure their cost.
    adaptive_metrics_enabled=os.environ.get("BENCH_ADAPTIVE_METRICS", "1") == "1",
    # The results in the README were measured with one short-task lane (off by default since
    # it runs tasks beyond -c); keep measuring that configuration.
    adaptive_short_task_reserve=int(os.environ.get("BENCH_ADAPTIVE_LANES", "1")),
)
# Pool settings of a configuration (the memory guard's of adaptive-memory), as JSON.
app.conf.update(json.loads(os.environ.get("BENCH_POOL_CONF") or "{}"))


def spin_cpu(ms: float) -> None:
    """Burn ``ms`` of this thread's CPU time (not wall time: contention makes it take longer)."""
    target = time.thread_time() + ms / 1000.0
    wall_deadline = time.monotonic() + ms / 1000.0 * _MAX_SPIN_WALL_FACTOR + _MAX_SPIN_WALL_EXTRA_S
    while time.thread_time() < target and time.monotonic() < wall_deadline:
        pass


def _done(**extra: Any) -> dict[str, Any]:
    return {"finished": time.time(), "pid": os.getpid(), **extra}


@app.task(name="bench.noop")
def noop() -> dict[str, Any]:
    return _done()


@app.task(name="bench.spin")
def spin(ms: float) -> dict[str, Any]:
    spin_cpu(ms)
    return _done()


# The mixed workload's two task types: a real application's short and long work are different
# tasks (a thumbnail and a transcode), which is what a pool can learn run times by.
@app.task(name="bench.spin_short")
def spin_short(ms: float) -> dict[str, Any]:
    spin_cpu(ms)
    return _done()


@app.task(name="bench.spin_long")
def spin_long(ms: float) -> dict[str, Any]:
    spin_cpu(ms)
    return _done()


@app.task(name="bench.sleep")
def sleep(ms: float) -> dict[str, Any]:
    time.sleep(ms / 1000.0)
    return _done()


@app.task(name="bench.tenant")
def tenant(key: str) -> dict[str, Any]:
    hit = key in _warm_tenants
    spin_cpu(WARM_MS if hit else WARMUP_MS)
    _warm_tenants[key] = None
    _warm_tenants.move_to_end(key)
    while len(_warm_tenants) > TENANT_CACHE:
        _warm_tenants.popitem(last=False)
    return _done(hit=hit)


@app.task(name="bench.hold_memory")
def hold_memory(mb: float, ms: float) -> dict[str, Any]:
    """Take ``mb`` MiB (every page touched, so it is resident), hold it ``ms``, free it."""
    block = bytearray(int(mb * 1024 * 1024))
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(ms / 1000.0)
    del block
    return _done()
