"""The Celery app the integration tests run in real workers.

Broker and backend come from $TEST_BROKER_URL / $TEST_BACKEND_URL (set by the test fixtures).
Every task here is something a test needs to provoke: crashes, limits, memory, identity.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

broker = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/15")
backend = os.environ.get("TEST_BACKEND_URL", broker)
app = Celery("proj", broker=broker, backend=backend, include=["tests.apps.proj"])
app.conf.update(
    worker_pool=os.environ.get("TEST_WORKER_POOL") or None,
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
    adaptive_cpu_placement=os.environ.get("TEST_CPU_PLACEMENT", "spread"),
    worker_pool_start_method=os.environ.get("TEST_START_METHOD", "fork"),
    worker_pool_restarts=bool(os.environ.get("TEST_POOL_RESTARTS")),
    adaptive_stabilization_window=float(os.environ.get("TEST_STABILIZATION", "30")),
    adaptive_control_interval=float(os.environ.get("TEST_CONTROL_INTERVAL", "1.0")),
    adaptive_autoscale=bool(os.environ.get("TEST_AUTOSCALE")),
    adaptive_min_children=int(os.environ.get("TEST_MIN_CHILDREN", "0")) or None,
    adaptive_max_children=int(os.environ.get("TEST_MAX_CHILDREN", "0")) or None,
)

_events: list[str] = []


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def pid() -> int:
    return os.getpid()


@app.task
def whoami() -> dict[str, Any]:
    return {"pid": os.getpid(), "cpus": sorted(os.sched_getaffinity(0))}


@app.task
def sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


@app.task
def spin(seconds: float) -> int:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return os.getpid()


@app.task
def boom(message: str = "boom") -> None:
    raise ValueError(message)


@app.task
def kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(5)


@app.task(acks_late=True, reject_on_worker_lost=True)
def kill_once(marker: str) -> int:
    """Dies the first time (SIGKILL); succeeds when redelivered."""
    import redis

    client = redis.Redis.from_url(backend)
    if client.set(f"kill-once:{marker}", "1", nx=True):
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


@app.task
def soft_limited(seconds: float) -> str:
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "soft-limit-caught"
    return "finished"


@app.task
def allocate(megabytes: int) -> int:
    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return os.getpid()


@app.task
def unpicklable() -> Any:
    return lambda: None


@app.task(acks_late=True)
def late_sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


@app.task
def process_init_seen() -> bool:
    return bool(os.environ.get("ADAPTIVE_TEST_PROCESS_INIT"))


from celery.signals import (  # noqa: E402
    worker_before_create_process,
    worker_process_init,
    worker_process_shutdown,
)


def _touch(prefix: str) -> None:
    directory = os.environ.get("TEST_SIGNAL_DIR")
    if directory:
        with open(os.path.join(directory, f"{prefix}-{os.getpid()}-{time.monotonic_ns()}"), "w"):
            pass


@worker_process_init.connect
def _mark_process_init(**_: Any) -> None:
    os.environ["ADAPTIVE_TEST_PROCESS_INIT"] = "1"
    _touch("init")


@worker_process_shutdown.connect
def _mark_process_shutdown(**_: Any) -> None:
    _touch("shutdown")


@worker_before_create_process.connect
def _mark_before_create(**_: Any) -> None:
    _touch("before-create")


class UnpicklableError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.callback = lambda: None  # an exception that cannot cross a process boundary


@app.task
def raise_unpicklable() -> None:
    raise UnpicklableError("cannot pickle me")
