"""Metrics: the pool measures itself and publishes it where users look.

- `snapshot`: frozen readings and snapshots, and the pure arithmetic (rates, utilization,
  percentiles over a sliding window).
- `sampler`: psutil per child (by pid) and per host, the broker backlog; off the event loop.
- `publisher`: a bounded queue drained by its own thread into Redis (`store` names the keys).
- `events`: the ``worker-adaptive-metrics`` Celery event.
- `prometheus`: an optional ``/metrics`` endpoint (extra dependency, off by default).
- `service`: ties them together for the pool adapter.
- `top`: ``celery adaptive top``, a reader of what the publisher writes.

The pool adapter calls only `start_for_pool` and the returned service's ``on_job_done``,
``summary`` and ``stop``.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery_adaptive.metrics.service import MetricsService

logger = logging.getLogger("celery_adaptive.metrics")


def start_for_pool(pool: Any, hostname: str | None) -> MetricsService | None:
    """Build and start the metrics service of a started pool; None when metrics are off.

    ``pool`` provides ``supervisor``, ``settings``, ``app``, ``consumer`` (set once the
    consumer starts) and optionally ``autoscaler`` (its forecast and decisions are published).
    """
    settings = pool.settings
    if not settings.metrics_enabled or pool.supervisor is None:
        return None
    from celery_adaptive.metrics.publisher import RedisPublisher
    from celery_adaptive.metrics.sampler import BrokerBacklog
    from celery_adaptive.metrics.service import MetricsService
    from celery_adaptive.metrics.store import redis_url_of_broker, resolve_redis_url, safe_url

    name = hostname or socket.gethostname()
    conf = pool.app.conf
    url = resolve_redis_url(conf, settings.metrics_redis_url)
    publisher = None
    if url is None:
        logger.info(
            "Pool metrics go to events and inspect stats only: the broker is not Redis and "
            "adaptive_metrics_redis_url is not set"
        )
    else:
        publisher = RedisPublisher(
            url, prefix=settings.metrics_key_prefix, hostname=name, ttl=settings.metrics_ttl,
            stream_length=settings.metrics_stream_length, stream_max_age=settings.metrics_stream_max_age,
        )
        logger.debug("Publishing pool metrics to %s", safe_url(url))
    broker_url = redis_url_of_broker(conf)
    service = MetricsService(
        pool.supervisor,
        hostname=name,
        interval=settings.metrics_interval,
        publisher=publisher,
        broker_backlog=BrokerBacklog(broker_url) if broker_url else None,
        consumer=lambda: getattr(pool, "consumer", None),
        autoscaler=lambda: getattr(pool, "autoscaler", None),
    )
    service.start()
    if settings.metrics_prometheus_port:
        from celery_adaptive.metrics.prometheus import PrometheusExporter

        exporter = PrometheusExporter(
            lambda: service.latest, settings.metrics_prometheus_port, settings.metrics_prometheus_address
        )
        if exporter.start():
            service.exporter = exporter
    return service


__all__ = ["start_for_pool"]
