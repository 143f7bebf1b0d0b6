"""Publishing snapshots to Redis, off the hot path.

::

    sampler thread ── offer(snapshot, history) ──> bounded deque (oldest dropped when full)
                                          │
                          publisher thread: take everything queued; TIME (the server's clock);
                          one pipeline:
                            XADD P:stream:H MINID ~ (now - max age) (each compact entry),
                            XTRIM MAXLEN ~ N, SET P:worker:H PX ttl (the newest, whole),
                            PEXPIRE stream, GET + SET P:owner:H, ZADD/ZREMRANGEBYSCORE/PEXPIRE
                            P:workers (scored by server time)

`store` documents the keys. Only the Redis server's clock orders and ages anything, so workers
with skewed clocks neither flap in ``celery adaptive top`` nor trim each other's history.

If Redis is down or slow, the batch goes back to the queue and the thread retries with a
backoff; the worker never waits for it. One warning per outage, one line when it ends; the
queued snapshots (up to the queue size) are published then, so the stream catches up.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from celery_adaptive.metrics.store import (
    index_key,
    latest_key,
    make_client,
    owner_key,
    safe_url,
    server_time,
    stream_key,
)

logger = logging.getLogger("celery_adaptive.metrics")

QUEUE_SIZE = 64
REDIS_TIMEOUT = 2.0
BACKOFF_MIN = 0.5
BACKOFF_MAX = 5.0
#: A hostname clash is logged again at most this often (seconds).
CLASH_WARNING_EVERY = 600.0
#: ``XADD ... MINID`` exists from Redis 6.2; older servers bound the stream by count only.
MINID_VERSION = (6, 2)

Entry = tuple[dict[str, Any], dict[str, str]]  # (the whole snapshot, its history entry)


class RedisPublisher:
    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        hostname: str,
        ttl: float,
        stream_length: int,
        stream_max_age: float = 900.0,
        queue_size: int = QUEUE_SIZE,
        client_factory: Callable[[str], Any] | None = None,
    ) -> None:
        self.url = url
        self.hostname = hostname
        self.ttl_ms = max(1, int(ttl * 1000))
        self.ttl = ttl
        self.stream_length = stream_length
        self.stream_max_age_ms = max(1, int(stream_max_age * 1000))
        self.latest_key = latest_key(prefix, hostname)
        self.stream_key = stream_key(prefix, hostname)
        self.index_key = index_key(prefix)
        self.owner_key = owner_key(prefix, hostname)
        #: Who publishes: this process, told apart from another worker with the same hostname.
        self.instance = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._client_factory = client_factory or (lambda u: make_client(u, REDIS_TIMEOUT))
        self._client: Any = None
        self._minid: bool | None = None  # the server supports XADD MINID (known once connected)
        self._foreign_owner_seen = 0
        self._clash_logged_at: float | None = None
        self.clash: str | None = None  # the other process publishing under this hostname
        self._queue: deque[Entry] = deque(maxlen=queue_size)
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

    def offer(self, snapshot: Mapping[str, Any], history: Mapping[str, str]) -> None:
        """Queue a snapshot (the whole one, for the latest key, and its compact history entry);
        never blocks for Redis. The oldest is dropped when the queue is full."""
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append((dict(snapshot), dict(history)))
            self._cond.notify()

    def stop(self, timeout: float = 1.0) -> None:
        """Publish what is queued if Redis answers within ``timeout``; then the thread ends."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def status(self) -> dict[str, Any]:
        out = {
            "redis": "down" if self._down_since is not None else "ok",
            "published": self.published,
            "dropped": self.dropped,
            "outages": self.outages,
        }
        if self.clash is not None:
            out["hostname_clash"] = self.clash
        return out

    # ------------------------------------------------------------------ publisher thread
    def _take(self) -> list[Entry] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            batch = list(self._queue)
            self._queue.clear()
            return batch

    def _put_back(self, batch: list[Entry]) -> None:
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
        self._release_owner()
        self._close_client()

    def _publish(self, batch: list[Entry]) -> None:
        client = self._client
        if client is None:
            client = self._client = self._client_factory(self.url)
        if self._minid is None:
            self._minid = _supports_minid(client)
        now = server_time(client)
        newest = batch[-1][0]
        pipe = client.pipeline(transaction=False)
        min_id = int(now * 1000) - self.stream_max_age_ms
        for _snapshot, history in batch:
            if self._minid:
                pipe.xadd(self.stream_key, history, minid=min_id, approximate=True)
            else:
                pipe.xadd(self.stream_key, history, maxlen=self.stream_length, approximate=True)
        if self._minid:
            pipe.xtrim(self.stream_key, maxlen=self.stream_length, approximate=True)
        pipe.set(self.latest_key, json.dumps(newest, separators=(",", ":")), px=self.ttl_ms)
        pipe.pexpire(self.stream_key, self.ttl_ms)
        pipe.get(self.owner_key)
        pipe.set(self.owner_key, self.instance, px=self.ttl_ms)
        pipe.zadd(self.index_key, {self.hostname: now})
        pipe.zremrangebyscore(self.index_key, "-inf", f"({now - self.ttl}")
        pipe.pexpire(self.index_key, self.ttl_ms)
        results = pipe.execute()
        self.published += len(batch)
        self._check_owner(results[-5])

    def _check_owner(self, previous: bytes | str | None) -> None:
        """Warn when another process keeps publishing under this hostname.

        One sighting of a foreign id is what a worker restarted within the TTL finds (its
        predecessor's id, overwritten now and never back); a second one means another live
        process writes the same keys.
        """
        if isinstance(previous, bytes):
            previous = previous.decode(errors="replace")
        if previous is None or previous == self.instance:
            return
        self._foreign_owner_seen += 1
        if self._foreign_owner_seen < 2:
            return
        self.clash = previous
        now = time.monotonic()
        if self._clash_logged_at is None or now - self._clash_logged_at >= CLASH_WARNING_EVERY:
            self._clash_logged_at = now
            logger.warning(
                "Two workers publish metrics under the hostname %s (this process is %s, the other "
                "%s): their snapshots overwrite each other in Redis and `celery adaptive top` shows "
                "one of them. Give each worker its own name (celery worker -n NAME@%%h).",
                self.hostname, self.instance, previous,
            )

    def _release_owner(self) -> None:
        """At stop: free the hostname for a successor (if it is still ours)."""
        client = self._client
        if client is None or self._down_since is not None:
            return
        try:
            current = client.get(self.owner_key)
            if current is not None and current.decode(errors="replace") == self.instance:
                client.delete(self.owner_key)
        except Exception:
            pass

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass


def _supports_minid(client: Any) -> bool:
    version = str(client.info("server").get("redis_version", "0"))  # a RedisError: retried
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    if parts >= MINID_VERSION:
        return True
    logger.info("Metrics Redis %s has no XADD MINID (6.2+): the history stream is bounded by count only",
                version)
    return False
