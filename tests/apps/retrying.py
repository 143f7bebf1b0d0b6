"""A task that retries with a countdown: loaded into tests.apps.proj's worker through
``TEST_CONF_JSON={"include": ["tests.apps.proj", "tests.apps.retrying"]}``.

``self.retry(countdown=...)`` publishes the task again with an ETA, which the worker then
holds like any countdown task (tests/integration/test_prefetch.py).
"""

from __future__ import annotations

import os
from typing import Any

import redis

from tests.apps.proj import app, backend


@app.task(bind=True, max_retries=1)
def retry_once(self: Any, marker: str, countdown: float) -> int:
    """Retries once after ``countdown`` seconds, then returns the child's pid."""
    client = redis.Redis.from_url(backend)
    if client.set(f"retry-once:{marker}", "1", nx=True, ex=600):
        raise self.retry(countdown=countdown)
    return os.getpid()
