"""Liveness and readiness of a worker on this pool, for exec and HTTP probes.

The pool knows whether it serves: its children are up, Celery's consumer is consuming, and
Celery's event loop turns. `HealthMonitor` (in `monitor`) keeps those three facts, fed by the
pool on the event loop, and answers two questions:

- **alive**: the event loop turned within ``adaptive_health_timeout`` seconds, or the consumer
  is not consuming (connecting to the broker, restarting after a connection loss, shutting
  down: Celery's own retry and shutdown logic bounds those). A stopped process (SIGSTOP, a
  debugger) or a loop blocked by a callback is not alive; a broker outage is not a reason to
  restart the worker.
- **ready**: alive, consuming (the loop turned since the consumer last started), and at least
  one child has started and is serving.

Two ways out, both optional:

- a status file (default ``<tmp>/celery-adaptive-health/<hostname>.json``) rewritten every
  ``adaptive_health_interval`` by the monitor's thread and read by ``celery -A proj adaptive
  health`` (`command`): exit 0 or 1, for Kubernetes exec probes;
- a tiny HTTP server (`http`), ``/healthz`` and ``/readyz`` (200 or 503), when
  ``adaptive_health_port`` is set; on 127.0.0.1 unless ``adaptive_health_address`` says
  otherwise.
"""

from celery_adaptive.health.monitor import HealthMonitor, HealthStatus, default_status_file

__all__ = ["HealthMonitor", "HealthStatus", "default_status_file"]
