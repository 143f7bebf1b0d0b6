"""Queue wait from publish to start: the producer stamps the time it publishes.

Celery's task messages carry no publish time, so the pool alone can measure only how long a
task waited inside the worker. To measure the whole wait (broker, prefetch and pool), call
`stamp_publish_time()` once in every process that sends tasks; the app module that producers
and workers share is the natural place::

    from celery_adaptive.publish_time import stamp_publish_time
    stamp_publish_time()

It connects a ``before_task_publish`` receiver (process-wide, every app) that adds the header
`HEADER`, epoch seconds on the producer's clock. The pool reads it when the task arrives
(`publish_wait`): the wait is the pool's clock minus the stamp, so producers and workers
should keep their clocks in sync (NTP); a negative difference counts as 0. For a task with an
ETA or countdown, the wait starts at its ETA, not at its publish time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

HEADER = "adaptive_published_at"
_DISPATCH_UID = "celery_adaptive.publish_time.stamp"


def _stamp(sender: Any = None, headers: Any = None, **_: Any) -> None:
    if isinstance(headers, dict):
        headers[HEADER] = time.time()


def stamp_publish_time() -> None:
    """Stamp every task this process publishes from now on. Idempotent."""
    from celery.signals import before_task_publish

    before_task_publish.connect(_stamp, weak=False, dispatch_uid=_DISPATCH_UID)


def publish_wait(request: Mapping[str, Any], now: float) -> float | None:
    """Seconds between the stamp (or the task's ETA, if later) and ``now`` (epoch); None when
    the message carries no stamp."""
    stamp = request.get(HEADER)
    if not isinstance(stamp, (int, float)) or isinstance(stamp, bool):
        return None
    start = float(stamp)
    eta = request.get("eta")
    if isinstance(eta, str) and eta:
        try:
            start = max(start, datetime.fromisoformat(eta).timestamp())
        except ValueError:
            pass
    return max(0.0, now - start)
