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
    # Outage tests restart Redis under running tasks: results are stored once it is back.
    result_backend_always_retry=True,
    result_backend_max_retries=50,
    adaptive_cpu_placement=os.environ.get("TEST_CPU_PLACEMENT", "spread"),
    worker_pool_start_method=os.environ.get("TEST_START_METHOD", "fork"),
    worker_pool_restarts=bool(os.environ.get("TEST_POOL_RESTARTS")),
    adaptive_stabilization_window=float(os.environ.get("TEST_STABILIZATION", "30")),
    adaptive_control_interval=float(os.environ.get("TEST_CONTROL_INTERVAL", "1.0")),
    adaptive_autoscale=bool(os.environ.get("TEST_AUTOSCALE")),
    # Short-task lanes add a child while long tasks run; most tests count children exactly,
    # so they run without lanes and the lane tests turn them on.
    adaptive_short_task_reserve=int(os.environ.get("TEST_SHORT_LANES", "0")),
    adaptive_min_children=int(os.environ.get("TEST_MIN_CHILDREN", "0")) or None,
    adaptive_max_children=int(os.environ.get("TEST_MAX_CHILDREN", "0")) or None,
    # Metrics: unset means the pool's default (None falls back to it).
    adaptive_metrics_enabled=os.environ.get("TEST_METRICS_ENABLED") or None,
    adaptive_metrics_interval=os.environ.get("TEST_METRICS_INTERVAL") or None,
    adaptive_metrics_ttl=os.environ.get("TEST_METRICS_TTL") or None,
    adaptive_metrics_stream_length=os.environ.get("TEST_METRICS_STREAM_LENGTH") or None,
    adaptive_metrics_stream_max_age=os.environ.get("TEST_METRICS_STREAM_MAX_AGE") or None,
    adaptive_metrics_redis_url=os.environ.get("TEST_METRICS_REDIS_URL") or None,
    adaptive_metrics_prometheus_port=os.environ.get("TEST_METRICS_PROMETHEUS_PORT") or None,
    adaptive_health_file=os.environ.get("TEST_HEALTH_FILE") or None,
    adaptive_health_port=os.environ.get("TEST_HEALTH_PORT") or None,
    adaptive_health_interval=os.environ.get("TEST_HEALTH_INTERVAL") or None,
    adaptive_health_timeout=os.environ.get("TEST_HEALTH_TIMEOUT") or None,
)
if os.environ.get("TEST_LOG_FORMAT"):  # e.g. with %(name)s, to tell the pool's lines from Celery's
    app.conf.worker_log_format = os.environ["TEST_LOG_FORMAT"]
if os.environ.get("TEST_CONF_JSON"):  # arbitrary settings, for the bad-settings table
    import json

    app.conf.update(json.loads(os.environ["TEST_CONF_JSON"]))

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


# -- the memory guard (tests/integration/test_memory.py) ---------------------------------------
def _grow_to(token: str, megabytes: int, step_mb: int, pause: float) -> list[bytearray]:
    """Allocate (and touch) ``megabytes`` in steps, noting each step's total in Redis first,
    so a test knows how far a task got before it was stopped."""
    import redis

    client = redis.Redis.from_url(backend)
    blocks: list[bytearray] = []
    for total in range(step_mb, megabytes + 1, step_mb):
        client.rpush(f"grown:{token}", total)
        block = bytearray(step_mb * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1
        blocks.append(block)
        time.sleep(pause)
    return blocks


@app.task
def grow(token: str, megabytes: int, step_mb: int = 10, pause: float = 0.02) -> int:
    _grow_to(token, megabytes, step_mb, pause)
    return os.getpid()


@app.task(acks_late=True, reject_on_worker_lost=True)
def grow_first_time(token: str, megabytes: int, step_mb: int = 10, pause: float = 0.02) -> int:
    """Grows past any limit the first time it runs; a redelivery returns its run number."""
    import redis

    run = int(redis.Redis.from_url(backend).rpush(f"runs:{token}", os.getpid()))
    if run == 1:
        _grow_to(token, megabytes, step_mb, pause)
    return run


@app.task
def hold_memory(token: str, megabytes: int, seconds: float) -> int:
    """Hold ``megabytes`` for ``seconds``; notes its start and end in Redis (for overlap)."""
    import redis

    client = redis.Redis.from_url(backend)
    client.rpush(f"spans:{token}", f"start {time.time()} {os.getpid()}")
    blocks = _grow_to(token, megabytes, megabytes, 0.0)
    time.sleep(seconds)
    client.rpush(f"spans:{token}", f"end {time.time()} {os.getpid()}")
    del blocks
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


# -- the failure table (tests/integration/test_failure_table.py) ------------------------------
def _misbehave(cause: str) -> Any:
    if cause == "raise":
        raise ValueError("misbehave: raise")
    if cause == "system_exit":
        raise SystemExit(3)
    if cause == "keyboard_interrupt":
        raise KeyboardInterrupt()
    if cause == "os_exit":
        os._exit(7)
    if cause == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(5)
    if cause == "segfault":
        import ctypes

        ctypes.string_at(0)
    if cause == "hang":
        time.sleep(60)
    return None


@app.task
def misbehave(cause: str, phase: str) -> Any:
    if phase == "run":
        if cause == "unpicklable_result":
            return lambda: None
        if cause == "large_result":
            return "x" * (20 * 1024 * 1024)
        if cause == "memory":
            block = bytearray(300 * 1024 * 1024)
            for i in range(0, len(block), 4096):
                block[i] = 1
            return len(block)
        if cause == "ignore_soft_limit":
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    time.sleep(0.05)
                except SoftTimeLimitExceeded:
                    pass  # ignored on purpose
            return "survived"
        _misbehave(cause)
    return "ok"


from celery.signals import task_postrun, task_prerun  # noqa: E402


@task_prerun.connect
def _misbehave_on_receive(task: Any = None, kwargs: Any = None, args: Any = None, **_: Any) -> None:
    if getattr(task, "name", "") == "tests.apps.proj.misbehave" and args and args[1] == "receive":
        _misbehave(args[0])


@task_postrun.connect
def _misbehave_on_return(task: Any = None, args: Any = None, **_: Any) -> None:
    if getattr(task, "name", "") == "tests.apps.proj.misbehave" and args and args[1] == "return":
        _misbehave(args[0])


# -- reliability and soak (tests/integration/test_reliability.py, test_soak.py) ---------------
@app.task(acks_late=True, reject_on_worker_lost=True)
def record(token: str, seconds: float = 0.0) -> int:
    """Counts each execution and where it ran, so tests can prove exactly-once (or why not)."""
    import redis

    client = redis.Redis.from_url(backend)

    def note(kind: str) -> None:
        # The outage tests restart Redis under this task: keep the bookkeeping through it, so
        # a task fails only for a reason the test is about.
        deadline = time.monotonic() + 30
        while True:
            try:
                client.rpush(f"{kind}:{token}", os.getpid())
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    note("runs")
    if seconds:
        time.sleep(seconds)
    note("done")
    return os.getpid()


@app.task
def stop_self() -> None:
    """Freeze this pool child mid-task (as a debugger, a cgroup freezer or SIGSTOP would)."""
    os.kill(os.getpid(), signal.SIGSTOP)


@app.task
def half_frame(seconds: float = 60.0) -> None:
    """Write the first half of a frame into this child's result pipe, then hang: what a C
    extension scribbling on an inherited descriptor looks like to the parent."""
    import gc
    import struct

    from billiard.connection import Connection

    writers = [o for o in gc.get_objects()
               if isinstance(o, Connection) and o.writable and not o.readable and not o.closed]
    written = 0
    for conn in writers:
        try:  # the parent's ends of other pipes, copied by fork, are closed in a child
            os.write(conn.fileno(), struct.pack("!i", 4096) + b"half")
            written += 1
        except OSError:
            pass
    assert written == 1, f"expected exactly this child's result pipe, wrote to {written}"
    time.sleep(seconds)


# -- Celery settings prefork honours (tests/integration/test_celery_settings.py) ---------------
@app.task
def fail_counted(token: str) -> None:
    """Fails every time; counts its runs (a redelivered message runs again)."""
    import redis

    redis.Redis.from_url(backend).rpush(f"runs:{token}", os.getpid())
    raise ValueError("fails on purpose")


@app.task
def hang_first_run(token: str, seconds: float) -> int:
    """Hangs (into a time limit) the first time it runs; returns its run number."""
    import redis

    run = int(redis.Redis.from_url(backend).rpush(f"runs:{token}", os.getpid()))
    if run == 1:
        time.sleep(seconds)
    return run


@app.task
def wait_for_file(token: str, path: str, seconds: float = 60.0) -> int:
    """Runs until ``path`` exists (at most ``seconds``), so a test decides when it ends."""
    import redis

    client = redis.Redis.from_url(backend)
    client.rpush(f"runs:{token}", os.getpid())
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    client.rpush(f"done:{token}", os.getpid())
    return os.getpid()


@worker_process_init.connect
def _hang_first_child(**_: Any) -> None:
    """With TEST_HANG_INIT_ONCE=<dir>: once <dir>/armed exists, the first child to create
    <dir>/hung hangs in worker_process_init, as a child stuck on a dead database would."""
    directory = os.environ.get("TEST_HANG_INIT_ONCE")
    if not directory or not os.path.exists(os.path.join(directory, "armed")):
        return
    try:
        os.close(os.open(os.path.join(directory, "hung"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    time.sleep(300)


from celery.worker.autoscale import Autoscaler  # noqa: E402


class CustomAutoscaler(Autoscaler):
    """A user's own autoscaler class (worker_autoscaler), which this pool does not use."""


# -- health probes (tests/integration/test_health.py) -----------------------------------------
from celery.worker.control import control_command  # noqa: E402


@control_command(args=[("seconds", float)], signature="<seconds>")
def block_event_loop(state: Any, seconds: float = 1.0) -> dict[str, str]:
    """Block the worker's event loop, with no task involved: remote control commands run on
    the loop itself. What a slow signal receiver or a stuck callback does to a worker."""
    time.sleep(min(float(seconds), 30.0))
    return {"ok": f"blocked {seconds} s"}


# -- task arguments never reach the pool's logs or metrics (tests/integration/test_secrets.py)
@app.task
def secret_task(secret: str, how: str, seconds: float = 0.0, token: str = "") -> Any:
    """Takes a secret argument through each of the pool's paths."""
    if how == "raise":
        raise ValueError(f"refused {secret}")
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "sleep":
        time.sleep(seconds)
    if how == "unpicklable":
        return (secret, lambda: None)
    return len(secret + token)
