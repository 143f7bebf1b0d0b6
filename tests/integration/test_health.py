"""Health probes with real workers: ``celery adaptive health`` (exec probes) and the HTTP
``/healthz`` ``/readyz`` endpoints, failing when the consumer loses its broker (readiness only)
and when the event loop stops turning (liveness): the loop blocked by a remote control command
(no task involved), and the whole worker process stopped with SIGSTOP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from celery_adaptive.embedded_redis import free_loopback_port
from tests.support import ROOT, Broker, wait_until

pytestmark = pytest.mark.integration

TIMEOUT = 2.0  # adaptive_health_timeout for these workers: a loop quiet this long is not alive


def _env(status_file: Path, port: int) -> dict[str, str]:
    return {"TEST_HEALTH_FILE": str(status_file), "TEST_HEALTH_PORT": str(port),
            "TEST_HEALTH_INTERVAL": "0.2", "TEST_HEALTH_TIMEOUT": str(TIMEOUT)}


def _http(port: int, path: str) -> int | None:
    """The endpoint's status code; None when it does not answer within a second."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1.0) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def _command(broker: Broker, *args: str) -> tuple[int, str]:
    env = dict(os.environ, TEST_BROKER_URL=broker.url, TEST_QUEUE=broker.queue)
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.proj", "adaptive", "health", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


def test_probes_follow_the_consumer_and_a_broker_outage(worker_factory, private_redis, tmp_path):
    broker = Broker(url=private_redis.url, queue=f"q-{uuid.uuid4().hex[:10]}")
    status_file, port = tmp_path / "health.json", free_loopback_port()
    worker = worker_factory("-c", "1", broker_=broker, env=_env(status_file, port))
    wait_until(lambda: _http(port, "/readyz") == 200, message="the worker to be ready")
    assert _http(port, "/healthz") == 200 and _http(port, "/nothing") == 404
    assert _command(broker, "--file", str(status_file)) == (0, "ready: consuming with 1 serving child(ren)\n")
    code, out = _command(broker, "--url", f"http://127.0.0.1:{port}")
    assert code == 0 and '"ready": true' in out

    # The broker goes away: the consumer is not consuming, so not ready; but alive (a broker
    # outage is no reason to restart a worker) for longer than the loop's timeout.
    private_redis.stop()
    wait_until(lambda: _http(port, "/readyz") == 503, timeout=30, message="not ready without a broker")
    code, out = _command(broker, "--file", str(status_file))
    assert code == 1 and out.startswith("not ready: not consuming"), out
    deadline = time.monotonic() + 2 * TIMEOUT
    while time.monotonic() < deadline:  # an observation window, not a timing assertion
        assert _http(port, "/healthz") == 200
        time.sleep(0.2)
    assert _command(broker, "--live", "--file", str(status_file))[0] == 0

    private_redis.start()
    wait_until(lambda: _http(port, "/readyz") == 200, timeout=60, message="ready again after the broker returned")
    assert broker.send("add", 1, 2).get(timeout=30) == 3
    assert worker.stop() == []
    assert not status_file.exists(), "a stopped worker leaves no status file behind"
    assert _command(broker, "--live", "--file", str(status_file))[0] == 1


def test_probes_fail_when_the_event_loop_stops(worker_factory, broker, tmp_path):
    status_file, port = tmp_path / "health.json", free_loopback_port()
    worker = worker_factory("-c", "1", env=_env(status_file, port))
    wait_until(lambda: _http(port, "/readyz") == 200, message="the worker to be ready")

    # 1. The loop is blocked (a remote control command sleeping on it): the process and the
    #    probes' threads run, and they say the loop does not turn.
    worker.broker.app.control.broadcast("block_event_loop", arguments={"seconds": 4 * TIMEOUT},
                                        destination=[worker.hostname], reply=False)
    wait_until(lambda: _http(port, "/healthz") == 503, timeout=20, message="not alive while the loop is blocked")
    code, out = _command(worker.broker, "--live", "--file", str(status_file))
    assert code == 1 and "the event loop has not turned" in out, out
    assert _http(port, "/readyz") == 503
    wait_until(lambda: _http(port, "/healthz") == 200, timeout=30, message="alive once the loop turns again")

    # 2. The worker's parent process is stopped: no answer over HTTP, a stale status file.
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        assert _http(port, "/healthz") is None
        wait_until(lambda: _command(worker.broker, "--live", "--file", str(status_file))[0] == 1,
                   timeout=30, interval=0.5, message="the exec probe to fail on a stale status file")
        code, out = _command(worker.broker, "--live", "--url", f"http://127.0.0.1:{port}", "--timeout", "1")
        assert code == 1 and "no answer" in out, out
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    wait_until(lambda: _http(port, "/readyz") == 200, timeout=30, message="ready after SIGCONT")
    assert worker.broker.send("add", 2, 2).get(timeout=30) == 4
