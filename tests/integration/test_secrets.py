"""Task arguments never reach logs or metrics from the pool's own code paths.

One real worker at ``-l debug`` runs a task whose arguments carry a secret through each of the
pool's paths (success, an exception, a child killed under it, an unpicklable result, a hard
time limit, revoke with terminate, the autoscaler sizing for it), with every output on:
events, Redis (a private metrics Redis), Prometheus, the health file, ``inspect stats``.

Celery itself logs task arguments at debug in its own code paths (``TaskPool: Apply ...
(args:...)`` from celery.concurrency.base, a task's exception from celery.app.trace): those are
Celery's, as under prefork. So the log is read with each record's logger name, and only the
records of ``celery_adaptive.*`` must not carry the secret; that the secret is in the log at
all (Celery's lines) shows the grep could see it.
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid

import pytest
import redis
from celery.exceptions import TimeLimitExceeded, WorkerLostError

from celery_adaptive.embedded_redis import free_loopback_port
from tests.integration.test_metrics import EVENT_TYPE, EventCapture
from tests.support import wait_until

pytestmark = pytest.mark.integration

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s %(name)s] %(message)s"
RECORD = re.compile(r"^\[[^\]]*: (\w+)/[^\] ]+ ([\w.]+)\] ")


def records(log: str) -> list[tuple[str, str]]:
    """(logger name, the record's text with any traceback lines that follow it)."""
    out: list[tuple[str, str]] = []
    for line in log.splitlines():
        match = RECORD.match(line)
        if match:
            out.append((match.group(2), line))
        elif out:  # a continuation: a traceback or a multi-line message
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
        else:
            out.append(("?", line))
    return out


def test_task_arguments_reach_no_pool_log_line_and_no_metric(worker_factory, broker, private_redis, tmp_path):
    pytest.importorskip("prometheus_client")
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    port = free_loopback_port()
    health = tmp_path / "health.json"
    with EventCapture(broker.app) as capture:
        worker = worker_factory("-c", "1", "-l", "debug", "--time-limit", "30", env={
            "TEST_LOG_FORMAT": LOG_FORMAT, "TEST_METRICS_REDIS_URL": private_redis.url,
            "TEST_METRICS_INTERVAL": "0.2", "TEST_METRICS_PROMETHEUS_PORT": str(port),
            "TEST_AUTOSCALE": "1", "TEST_MIN_CHILDREN": "1", "TEST_MAX_CHILDREN": "2",
            "TEST_HEALTH_FILE": str(health),
        })
        assert broker.send("secret_task", secret, "ok", kwargs={"token": secret}).get(timeout=30) == 2 * len(secret)
        with pytest.raises(ValueError):
            broker.send("secret_task", secret, "raise").get(timeout=30)
        with pytest.raises(WorkerLostError):
            broker.send("secret_task", secret, "kill").get(timeout=30)
        with pytest.raises(Exception, match="serializ|pickl|MaybeEncodingError"):
            broker.send("secret_task", secret, "unpicklable").get(timeout=30)
        with pytest.raises(TimeLimitExceeded):
            broker.send("secret_task", secret, "sleep", 20.0, time_limit=1).get(timeout=30)
        running = broker.send("secret_task", secret, "sleep", 20.0)
        wait_until(lambda: any(t["id"] == running.id for ts in (worker.inspect().active() or {}).values() for t in ts),
                   message="the task to run")
        broker.app.control.revoke(running.id, terminate=True)
        wait_until(lambda: running.state == "REVOKED", timeout=30, message="the revoke")
        seq = worker.pool_info()["metrics"]["seq"]
        wait_until(lambda: capture.wait_for(lambda e: e["hostname"] == worker.hostname and e["seq"] > seq + 2),
                   message="snapshots after every task")
        events = json.dumps(capture.of(worker.hostname))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        scrape = response.read().decode()
    stats = json.dumps(worker.stats())
    health_file = health.read_text()
    metrics = redis.Redis.from_url(private_redis.url)
    keys = list(metrics.scan_iter(match="*"))
    dumps = {key: metrics.dump(key) or b"" for key in keys}
    assert worker.stop() == []
    log = worker.log()

    # The secret was within reach: Celery's own debug lines carry it (its paths, not ours).
    assert secret in log
    pool = [text for name, text in records(log) if name.startswith("celery_adaptive")]
    joined = "\n".join(pool)
    # The pool spoke about these jobs (children killed, replaced, the autoscaler's decisions)...
    assert "Autoscale:" in joined and "exited" in joined and len(pool) > 20, joined[-3000:]
    # ...and never with their arguments.
    assert not [text for text in pool if secret in text]
    assert secret not in scrape and "celery_adaptive_task_runtime_seconds_count" in scrape
    assert secret not in events and EVENT_TYPE in events
    assert secret not in stats and '"implementation": "celery_adaptive:Pool"' in stats
    assert secret not in health_file and '"ready": true' in health_file
    assert any(key.startswith(b"celery-adaptive:stream:") for key in keys)
    assert not [key for key, dump in dumps.items() if secret.encode() in dump]
