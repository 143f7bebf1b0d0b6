"""Celery settings for the example project, read from the environment.

Every value an operator changes between a laptop and a container comes from an environment
variable, so the same code runs in ``docker compose``, in the demo and in the tests.
"""

from __future__ import annotations

import os


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None


broker_url = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")
result_backend = os.environ.get("CELERY_RESULT_BACKEND", broker_url)
result_expires = 3600

# The pool this project exists to show. `-P celery_adaptive:Pool` on the command line does the
# same; the setting keeps a bare `celery -A example_project worker` on it too.
worker_pool = "celery_adaptive:Pool"
worker_hijack_root_logger = False
broker_connection_retry_on_startup = True

# Flower draws its task and worker pages from events.
worker_send_task_events = True
task_send_sent_event = True

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]

# The message header whose value keys a task to a tenant (the pool's default is the same).
adaptive_affinity_header = "affinity"

# The periodic burst producer: run `celery -A example_project beat` to enable it.
beat_schedule = {
    "burst": {
        "task": "example_project.tasks.produce_burst",
        "schedule": _env_float("BURST_INTERVAL", 60.0),
        "args": (int(_env_float("BURST_SIZE", 40)),),
    },
}
beat_schedule_filename = os.environ.get("CELERY_BEAT_SCHEDULE_FILE", "celerybeat-schedule")

# The pool's predictive autoscaler runs with `--autoscale MAX,MIN`. It shrinks the pool only
# after demand stayed lower for this long; the demo shortens it so its pauses show a shrink.
adaptive_stabilization_window = _env_float("ADAPTIVE_STABILIZATION_WINDOW", 30.0)
