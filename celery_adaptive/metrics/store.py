"""Where metrics live in Redis: key names, which Redis, and the client settings.

Keys (``P`` is ``adaptive_metrics_key_prefix``, default ``celery-adaptive``; ``H`` the worker's
hostname, e.g. ``celery@web1``). Every key is bounded in size and expires, so metrics can share
the broker's Redis (the default when the broker is Redis) without growing under
``maxmemory``/``noeviction``; ``adaptive_metrics_redis_url`` moves them to another Redis or DB.

``P:worker:H``
    String: the latest snapshot as JSON (a few KB). Expires ``adaptive_metrics_ttl`` seconds
    after the last publish, so a dead worker's entry vanishes.
``P:stream:H``
    Stream: one compact entry per snapshot (`Snapshot.to_history`: ~20 flat fields, about
    100 bytes). Trimmed by age with ``XADD MINID ~`` (``adaptive_metrics_stream_max_age``
    seconds of Redis server time; stream IDs are the server's clock) and by count with
    ``XTRIM MAXLEN ~ adaptive_metrics_stream_length``; expires like the latest key.
``P:workers``
    Sorted set: hostname -> Redis server time (seconds) of its last publish. Readers (``celery
    adaptive top``) list workers from it and age them against the server's ``TIME``, never
    against a worker's wall clock; publishers drop members older than the TTL, and the set
    itself expires when no worker publishes.
``P:owner:H``
    String: the id (host/pid/random) of the worker process publishing under ``H``, with the
    same TTL. A publisher that keeps finding another process's id there warns that two workers
    share one hostname (their snapshots would overwrite each other).

Shared by the publisher (worker side) and ``top`` (reader side), so both agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_PREFIX = "celery-adaptive"


def latest_key(prefix: str, hostname: str) -> str:
    return f"{prefix}:worker:{hostname}"


def stream_key(prefix: str, hostname: str) -> str:
    return f"{prefix}:stream:{hostname}"


def index_key(prefix: str) -> str:
    return f"{prefix}:workers"


def owner_key(prefix: str, hostname: str) -> str:
    return f"{prefix}:owner:{hostname}"


def server_time(client: Any) -> float:
    """The Redis server's clock, in seconds (the one clock every worker and reader shares)."""
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1e6


def redis_url_of_broker(conf: Mapping[str, Any] | Any) -> str | None:
    """The broker's URL when the broker is Redis (the first one of a failover list), else None."""
    getter = getattr(conf, "get", None)
    if getter is None:
        return None
    url = getter("broker_write_url") or getter("broker_url")
    if isinstance(url, (list, tuple)):
        url = url[0] if url else None
    if not isinstance(url, str):
        return None
    url = url.split(";")[0].strip()
    if url.startswith(("redis://", "rediss://")):
        return url
    if url.startswith("redis+socket://"):
        return "unix://" + url[len("redis+socket://"):]
    return None


def resolve_redis_url(conf: Mapping[str, Any] | Any, explicit: str | None = None) -> str | None:
    """The Redis for metrics: ``explicit``, else ``adaptive_metrics_redis_url``, else the broker's
    when it is Redis; None when there is none (metrics then go to events and stats only)."""
    if explicit:
        return explicit
    getter = getattr(conf, "get", None)
    configured = getter("adaptive_metrics_redis_url") if getter is not None else None
    if configured:
        return str(configured)
    return redis_url_of_broker(conf)


def key_prefix(conf: Mapping[str, Any] | Any) -> str:
    getter = getattr(conf, "get", None)
    prefix = getter("adaptive_metrics_key_prefix") if getter is not None else None
    return str(prefix) if prefix else DEFAULT_PREFIX


def safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def make_client(url: str, timeout: float) -> Any:
    """A Redis client that fails fast and never retries by itself (callers decide when to)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
    )
