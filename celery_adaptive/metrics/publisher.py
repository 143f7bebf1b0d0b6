"""Publishing snapshots to Redis, off the hot path.

::

    sampler thread ── offer(dict) ──> bounded deque (oldest dropped when full)
                                          │
                          publisher thread: take everything queued, one pipeline:
                            XADD P:stream:H MAXLEN ~ N (each), SET P:worker:H PX ttl (newest),
                            PEXPIRE stream, ZADD/ZREMRANGEBYSCORE/PEXPIRE P:workers

If Redis is down or slow, the batch goes back to the queue and the thread retries with a
backoff; the worker never waits for it. One warning per outage, one line when it ends; the
queued snapshots (up to the queue size) are published then, so the stream catches up.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from celery_adaptive.metrics.store import (
    STREAM_FIELD,
    index_key,
    latest_key,
    make_client,
    safe_url,
    stream_key,
)

logger = logging.getLogger("celery_adaptive.metrics")

QUEUE_SIZE = 64
REDIS_TIMEOUT = 2.0
BACKOFF_MIN = 0.5
BACKOFF_MAX = 5.0


class RedisPublisher:
    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        hostname: str,
        ttl: float,
        stream_length: int,
        queue_size: int = QUEUE_SIZE,
        client_factory: Callable[[str], Any] | None = None,
    ) -> None:
        self.url = url
        self.hostname = hostname
        self.ttl_ms = max(1, int(ttl * 1000))
        self.ttl = ttl
        self.stream_length = stream_length
        self.latest_key = latest_key(prefix, hostname)
        self.stream_key = stream_key(prefix, hostname)
        self.index_key = index_key(prefix)
        self._client_factory = client_factory or (lambda u: make_client(u, REDIS_TIMEOUT))
        self._client: Any = None
        self._queue: deque[dict[str, Any]] = deque(maxlen=queue_size)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self.published = 0
        self.dropped = 0
        self.outages = 0

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="adaptive-metrics-publish", daemon=True)
        self._thread.start()

    def offer(self, snapshot: Mapping[str, Any]) -> None:
        """Queue a snapshot; never blocks for Redis. The oldest is dropped when the queue is full."""
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(dict(snapshot))
            self._cond.notify()

    def stop(self, timeout: float = 1.0) -> None:
        """Publish what is queued if Redis answers within ``timeout``; then the thread ends."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def status(self) -> dict[str, Any]:
        return {
            "redis": "down" if self._down_since is not None else "ok",
            "published": self.published,
            "dropped": self.dropped,
            "outages": self.outages,
        }

    # ------------------------------------------------------------------ publisher thread
    def _take(self) -> list[dict[str, Any]] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            batch = list(self._queue)
            self._queue.clear()
            return batch

    def _put_back(self, batch: list[dict[str, Any]]) -> None:
        """Return an unpublished batch to the front; what no longer fits (the oldest) is dropped."""
        with self._cond:
            room = (self._queue.maxlen or 0) - len(self._queue)
            keep = batch[-room:] if room > 0 else []
            self.dropped += len(batch) - len(keep)
            self._queue.extendleft(reversed(keep))

    def _run(self) -> None:
        import redis

        backoff = BACKOFF_MIN
        while True:
            batch = self._take()
            if batch is None:
                break
            try:
                self._publish(batch)
            except (redis.RedisError, OSError) as exc:
                self._put_back(batch)
                self._close_client()
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    self.outages += 1
                    logger.warning(
                        "Metrics Redis %s is unavailable (%s); tasks are unaffected, up to %d "
                        "snapshots are kept until it returns",
                        safe_url(self.url), exc, self._queue.maxlen,
                    )
                with self._cond:
                    if self._stopping:
                        break
                    self._cond.wait(backoff)  # a stop request wakes this early
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            except Exception:
                logger.exception("Publishing metrics failed; dropping %d snapshot(s)", len(batch))
                self.dropped += len(batch)
                continue
            backoff = BACKOFF_MIN
            if self._down_since is not None:
                logger.warning(
                    "Metrics Redis %s is back after %.1fs; publishing resumed (%d snapshot(s) dropped so far)",
                    safe_url(self.url), time.monotonic() - self._down_since, self.dropped,
                )
                self._down_since = None
        self._close_client()

    def _publish(self, batch: list[dict[str, Any]]) -> None:
        if self._client is None:
            self._client = self._client_factory(self.url)
        newest = batch[-1]
        pipe = self._client.pipeline(transaction=False)
        for snapshot in batch:
            pipe.xadd(
                self.stream_key, {STREAM_FIELD: json.dumps(snapshot, separators=(",", ":"))},
                maxlen=self.stream_length, approximate=True,
            )
        pipe.set(self.latest_key, json.dumps(newest, separators=(",", ":")), px=self.ttl_ms)
        pipe.pexpire(self.stream_key, self.ttl_ms)
        taken_at = float(newest.get("taken_at") or time.time())
        pipe.zadd(self.index_key, {self.hostname: taken_at})
        pipe.zremrangebyscore(self.index_key, "-inf", f"({taken_at - self.ttl}")
        pipe.pexpire(self.index_key, self.ttl_ms)
        pipe.execute()
        self.published += len(batch)

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
