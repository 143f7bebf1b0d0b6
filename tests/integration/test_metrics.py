"""Metrics (issue 6) with real workers on a real Redis: the event, the Redis keys, inspect stats,
`celery adaptive top`, Flower, and a metrics-Redis outage.

Metrics go to the broker's Redis unless a test points them at a `private_redis` it can
reconfigure or stop. Intervals and TTLs are shortened through the TEST_METRICS_* variables
that tests/apps/proj.py maps onto the app's settings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_adaptive.controller import CAUSES
from celery_adaptive.embedded_redis import free_loopback_port
from celery_adaptive.metrics.events import EVENT_TYPE, RESERVED_FIELDS
from celery_adaptive.metrics.publisher import RedisPublisher
from celery_adaptive.metrics.snapshot import HISTORY_FIELDS
from celery_adaptive.metrics.store import index_key, latest_key, owner_key, server_time, stream_key
from tests.support import ROOT, wait_until

pytestmark = pytest.mark.integration

PREFIX = "celery-adaptive"


class EventCapture:
    """A real `app.events.Receiver` on the test broker, in a thread, collecting one event type
    (or every type, with "*")."""

    def __init__(self, app: Any, event_type: str = EVENT_TYPE) -> None:
        self.app = app
        self.event_type = event_type
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._receiver: Any = None
        self._conn: Any = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(event)

    def _run(self) -> None:
        try:
            self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as exc:  # surfaced by wait_for
            self.error = exc

    def __enter__(self) -> EventCapture:
        self._conn = self.app.connection_for_read()
        self._receiver = self.app.events.Receiver(self._conn, handlers={self.event_type: self._on_event})
        self._thread = threading.Thread(target=self._run, name="event-capture", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._receiver.should_stop = True
        if self._thread is not None:
            self._thread.join(10)
        self._conn.release()

    def wait_for(self, predicate: Callable[[dict[str, Any]], Any], timeout: float = 20.0,
                 message: str = "a metrics event") -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            assert self.error is None, f"event receiver failed: {self.error!r}"
            with self._lock:
                events = list(self.events)
            return next((e for e in reversed(events) if predicate(e)), None)

        return wait_until(found, timeout, 0.1, message)

    def of(self, hostname: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("hostname") == hostname]


def _metrics_env(**extra: str) -> dict[str, str]:
    env = {"TEST_METRICS_INTERVAL": "0.5"}
    env.update(extra)
    return env


def _latest(client: redis.Redis, hostname: str) -> dict[str, Any] | None:
    raw = client.get(latest_key(PREFIX, hostname))
    return json.loads(raw) if raw else None


# ---------------------------------------------------------------------------- the event
def test_event_shows_a_busy_child_and_an_idle_one(worker_factory, broker):
    with EventCapture(broker.app) as capture:
        worker = worker_factory("-c", "2", env=_metrics_env())
        capture.wait_for(
            lambda e: e["hostname"] == worker.hostname
            and [c["state"] for c in e["children"]] == ["idle", "idle"],
            message="an event with two ready children",
        )
        result = broker.send("spin", 4.0)

        def spinning(event: dict[str, Any]) -> bool:
            if event["hostname"] != worker.hostname:
                return False
            busy = [c for c in event["children"] if c.get("task_name") == "tests.apps.proj.spin"]
            return bool(busy) and busy[0]["state"] == "busy" and busy[0].get("utilization", 0) >= 0.9

        event = capture.wait_for(spinning, timeout=15, message="an event with the spinning child busy")
        assert result.get(timeout=30) in worker.child_pids()

    # The dispatcher's own fields are untouched (pid is the worker's), ours avoid reserved names.
    assert event["type"] == EVENT_TYPE and event["pid"] == worker.pid
    ours = set(event) - {"type", "hostname", "timestamp", "utcoffset", "pid", "clock", "local_received"}
    assert ours == {"schema", "seq", "taken_at", "interval", "pool", "latency", "children", "host",
                    "memory"}
    # The memory watcher's view: admission, and the container's (or host's) memory.
    assert event["memory"]["admission"] == "open"
    assert 0 < event["memory"]["used_bytes"] < event["memory"]["limit_bytes"]
    assert not ours & RESERVED_FIELDS

    during = [e for e in capture.of(worker.hostname) if spinning(e)]
    by_pid = {c["pid"]: c for c in event["children"]}
    busy = next(c for c in by_pid.values() if c.get("task_name"))
    idle = next(c for c in by_pid.values() if not c.get("task_name"))
    assert busy["task_running_s"] > 0 and busy["cpu"] is not None
    # CPU%: measured by psutil over the interval. The spinning child burns its CPU (some samples
    # may be shared with other load on the machine); the idle one does nothing.
    assert max(c["cpu_percent"] for e in during for c in e["children"] if c.get("task_name")) >= 40
    assert idle["state"] == "idle" and idle["utilization"] <= 0.1 and idle["cpu_percent"] <= 10
    assert busy["rss_bytes"] > 1_000_000 and idle["rss_bytes"] > 1_000_000
    assert event["pool"]["children"] == {"current": 2, "target": 2, "min": 2, "max": 2,
                                         "states": {"busy": 1, "idle": 1}}
    assert 0.4 <= event["pool"]["utilization"] <= 0.6
    assert "cpu_percent" in event["host"] and "memory_percent" in event["host"]
    seqs = [e["seq"] for e in capture.of(worker.hostname)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_latency_percentiles_come_from_finished_tasks(worker_factory, broker):
    with EventCapture(broker.app) as capture:
        worker = worker_factory("-c", "2", env=_metrics_env())
        results = [broker.send("sleep", 0.3) for _ in range(4)] + [broker.send("add", i, i) for i in range(10)]
        for r in results:
            r.get(timeout=30)
        event = capture.wait_for(
            lambda e: e["hostname"] == worker.hostname and e["latency"]["overall"]["count"] >= 14,
            message="an event counting the 14 finished tasks",
        )
    latency = event["latency"]
    sleep = latency["tasks"]["tests.apps.proj.sleep"]
    add = latency["tasks"]["tests.apps.proj.add"]
    assert sleep["count"] == 4 and add["count"] == 10
    assert 0.3 <= sleep["run"]["p50"] < 1.0 and sleep["run"]["p99"] >= sleep["run"]["p50"]
    assert add["run"]["p99"] < 0.3
    # 4 sleeps of 0.3 s on 2 children: some of them waited for a child.
    assert latency["overall"]["wait"]["p99"] >= 0.2
    tasks = event["pool"]["tasks"]
    assert tasks["received"] == tasks["succeeded"] == tasks["completed"] == 14


# ---------------------------------------------------------------------------- inspect and top
def test_inspect_stats_and_top_show_the_worker(worker_factory, broker):
    worker = worker_factory("-c", "2", env=_metrics_env())
    for r in [broker.send("add", 1, i) for i in range(5)]:
        r.get(timeout=20)

    def summary() -> dict[str, Any] | None:
        metrics = worker.pool_info().get("metrics") or {}
        published = (metrics.get("redis") or {}).get("published", 0)
        return metrics if metrics.get("completions_in_window", 0) >= 5 and published >= 1 else None

    # The publisher thread writes a moment after the snapshot: wait for both, do not race them.
    metrics = wait_until(summary, message="inspect stats to carry the metrics summary")
    json.dumps(metrics)
    assert metrics["redis"]["redis"] == "ok" and metrics["redis"]["published"] >= 1
    assert metrics["events_sent"] >= 1
    assert 0 <= metrics["utilization"] <= 1
    assert metrics["run_p50_s"] < 1.0 and "wait_p99_s" in metrics
    assert metrics["interval"] == 0.5

    env = dict(os.environ, TEST_BROKER_URL=broker.url, TEST_QUEUE=broker.queue)
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.proj", "adaptive", "top", "--once"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), done.stdout
    assert any(line.startswith(worker.hostname) for line in lines), done.stdout
    for pid in worker.child_pids():
        assert str(pid) in done.stdout
    assert "tests.apps.proj.add" in done.stdout or "proj.add" in done.stdout


# ---------------------------------------------------------------------------- Redis keys
def test_redis_snapshot_and_stream_exist_expire_and_are_capped(worker_factory, broker, private_redis):
    metrics = redis.Redis.from_url(private_redis.url)
    # MAXLEN ~ trims whole stream nodes; small nodes make the cap visible after a few entries.
    metrics.config_set("stream-node-max-entries", 4)
    worker = worker_factory("-c", "1", env=_metrics_env(
        TEST_METRICS_REDIS_URL=private_redis.url, TEST_METRICS_INTERVAL="0.1",
        TEST_METRICS_TTL="2", TEST_METRICS_STREAM_LENGTH="5",
    ))
    marker = f"secret-{uuid.uuid4().hex}"
    with pytest.raises(ValueError, match=marker):
        broker.send("boom", marker).get(timeout=20)
    assert broker.send("add", marker, "-result").get(timeout=20) == f"{marker}-result"

    snapshot = wait_until(
        lambda: (s := _latest(metrics, worker.hostname)) and s["seq"] >= 40 and s["pool"]["tasks"]["completed"] >= 2 and s,
        message="40 snapshots in the metrics Redis",
    )
    latest, stream, index = latest_key(PREFIX, worker.hostname), stream_key(PREFIX, worker.hostname), index_key(PREFIX)
    assert snapshot["hostname"] == worker.hostname
    assert snapshot["pool"]["tasks"]["failed"] == 1 and snapshot["pool"]["tasks"]["succeeded"] == 1
    assert 0 < metrics.pttl(latest) <= 2000
    assert 0 < metrics.pttl(stream) <= 2000
    assert metrics.zscore(index, worker.hostname) is not None
    assert metrics.xlen(stream) <= 5 + 4  # capped: the length plus at most one node
    entries = metrics.xrange(stream)
    # Compact entries: the same flat fields every time (Redis keeps the names once per node).
    assert all(tuple(k.decode() for k in fields) == HISTORY_FIELDS for _, fields in entries)
    seqs = [int(fields[b"seq"]) for _, fields in entries]
    assert seqs == sorted(seqs) and seqs[-1] >= 40 - 1
    assert int(entries[-1][1][b"failed"]) == 1 and int(entries[-1][1][b"succeeded"]) == 1
    # Task arguments and results never reach the metrics.
    for key in (latest, stream, owner_key(PREFIX, worker.hostname)):
        dump = metrics.dump(key) or b""
        assert marker.encode() not in dump
    assert all(marker.encode() not in b"".join(fields.values()) for _, fields in entries)

    assert worker.stop() == []
    wait_until(lambda: not metrics.exists(latest) and not metrics.exists(stream), timeout=10,
               message="a stopped worker's keys to expire")


def test_metrics_redis_outage_does_not_stop_tasks(worker_factory, broker, private_redis):
    metrics = redis.Redis.from_url(private_redis.url)
    worker = worker_factory("-c", "2", env=_metrics_env(
        TEST_METRICS_REDIS_URL=private_redis.url, TEST_METRICS_INTERVAL="0.2", TEST_METRICS_TTL="60",
    ))
    wait_until(lambda: _latest(metrics, worker.hostname), message="a first snapshot")
    metrics.close()

    private_redis.stop()
    results = [broker.send("add", i, i) for i in range(40)]
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(40)]
    wait_until(lambda: "is unavailable" in worker.log(), message="the outage warning")
    # Measuring goes on without Redis: inspect stats has the 40 completions and the outage.
    down = wait_until(
        lambda: (m := worker.pool_info().get("metrics")) and m["redis"]["redis"] == "down"
        and m.get("completions_in_window") == 40 and m,
        message="inspect stats to report the metrics Redis down and the 40 completions",
    )
    more = [broker.send("add", 1, i) for i in range(10)]
    assert [r.get(timeout=30) for r in more] == [1 + i for i in range(10)]
    time.sleep(1.0)  # a few snapshots are taken while Redis is down (they are queued)

    private_redis.start()
    metrics = redis.Redis.from_url(private_redis.url)
    after = wait_until(
        lambda: (s := _latest(metrics, worker.hostname)) and s["pool"]["tasks"]["succeeded"] == 50 and s,
        timeout=30, message="publishing to resume",
    )
    assert after["seq"] > down["seq"]
    seqs = [int(f[b"seq"]) for _, f in metrics.xrange(stream_key(PREFIX, worker.hostname))]
    assert min(seqs) <= down["seq"] < max(seqs), "the snapshots queued during the outage were published"
    log = worker.log()
    assert log.count("is unavailable") == 1, "one warning per outage"
    assert log.count("publishing resumed") == 1
    assert "Traceback" not in log
    wait_until(lambda: worker.pool_info()["metrics"]["redis"]["redis"] == "ok", message="status ok again")


def test_publisher_keeps_the_newest_snapshots_while_redis_is_down(private_redis, caplog):
    """The publisher alone: bounded queue, one warning per outage, catch-up after."""
    caplog.set_level(logging.WARNING, logger="celery_adaptive.metrics")
    publisher = RedisPublisher(private_redis.url, prefix="t", hostname="h@x", ttl=30, stream_length=100,
                               queue_size=5)
    publisher.start()
    try:
        publisher.offer({"seq": 0, "taken_at": time.time()}, {"seq": "0"})
        client = redis.Redis.from_url(private_redis.url)
        wait_until(lambda: client.get(latest_key("t", "h@x")), message="first publish")
        client.close()
        private_redis.stop()
        for seq in range(1, 21):
            publisher.offer({"seq": seq, "taken_at": time.time()}, {"seq": str(seq)})
            time.sleep(0.02)
        wait_until(lambda: publisher.status()["redis"] == "down", message="the publisher to notice")
        private_redis.start()
        client = redis.Redis.from_url(private_redis.url)
        wait_until(lambda: (raw := client.get(latest_key("t", "h@x"))) and json.loads(raw)["seq"] == 20,
                   timeout=20, message="catch-up")
        seqs = [int(f[b"seq"]) for _, f in client.xrange(stream_key("t", "h@x"))]
        assert seqs == list(range(16, 21)), "the newest 5 were kept, in order"
        assert publisher.status()["dropped"] == 15 and publisher.status()["outages"] == 1
        warnings = [r for r in caplog.records if "is unavailable" in r.getMessage()]
        assert len(warnings) == 1
        client.close()
    finally:
        publisher.stop()


def test_stream_is_trimmed_by_age_on_the_server_clock(private_redis):
    client = redis.Redis.from_url(private_redis.url)
    client.config_set("stream-node-max-entries", 4)  # MINID ~ trims whole nodes: small ones
    publisher = RedisPublisher(private_redis.url, prefix="t", hostname="h@x", ttl=30, stream_length=1000,
                               stream_max_age=1.0)
    publisher.start()
    try:
        for seq in range(60):  # 3 s of snapshots, 20 a second
            publisher.offer({"seq": seq, "taken_at": 0.0}, {"seq": str(seq)})
            time.sleep(0.05)
        wait_until(lambda: publisher.published == 60, message="every snapshot published")
        entries = client.xrange(stream_key("t", "h@x"))
        oldest_ms = int(entries[0][0].split(b"-")[0])
        # Within the age (plus one node of slack), on the server's clock: taken_at is 0.
        assert server_time(client) * 1000 - oldest_ms <= 1000 + 500
        assert len(entries) < 40 and int(entries[-1][1][b"seq"]) == 59
    finally:
        publisher.stop()
        client.close()


def test_workers_are_aged_by_the_server_clock_not_theirs(private_redis):
    """A worker whose clock is an hour behind is listed as fresh, and its publish time in the
    index is the server's."""
    from celery_adaptive.metrics.top import load_snapshots, render

    client = redis.Redis.from_url(private_redis.url)
    publisher = RedisPublisher(private_redis.url, prefix="t", hostname="skewed@x", ttl=30, stream_length=10)
    publisher.start()
    try:
        skewed = time.time() - 3600
        publisher.offer({"hostname": "skewed@x", "seq": 1, "taken_at": skewed, "interval": 2.0}, {"seq": "1"})
        wait_until(lambda: publisher.published == 1, message="the snapshot published")
        assert abs(client.zscore(index_key("t"), "skewed@x") - server_time(client)) < 5
        [snapshot] = load_snapshots(client, "t")
        assert snapshot["seen_s"] < 5
        screen = "\n".join(render([snapshot], skewed))
        assert "STALE" not in screen and "skewed@x" in screen
    finally:
        publisher.stop()
        client.close()


def test_two_workers_publishing_under_one_hostname_are_told_apart(private_redis, caplog):
    caplog.set_level(logging.WARNING, logger="celery_adaptive.metrics")
    made: list[RedisPublisher] = []

    def publisher() -> RedisPublisher:
        made.append(RedisPublisher(private_redis.url, prefix="t", hostname="same@x", ttl=30, stream_length=10))
        made[-1].start()
        return made[-1]

    def publish(p: RedisPublisher, seq: int) -> None:
        before = p.published
        p.offer({"seq": seq, "taken_at": time.time()}, {"seq": str(seq)})
        wait_until(lambda: p.published > before, message="a publish")

    try:
        # A restart: the predecessor stopped cleanly, or died and never publishes again.
        first = publisher()
        publish(first, 1)
        first.stop()
        crashed = publisher()
        publish(crashed, 1)
        successor = publisher()
        for seq in range(3):
            publish(successor, seq)
        assert "same@x" not in caplog.text and successor.clash is None
        # Two live processes under one name: both find the other's id again and again.
        twin = publisher()
        for seq in range(3):
            publish(successor, 10 + seq)
            publish(twin, 10 + seq)
        warnings = [r.getMessage() for r in caplog.records if "publish metrics under the hostname same@x" in r.getMessage()]
        assert len(warnings) == 2, warnings  # one from each, then quiet for CLASH_WARNING_EVERY
        assert successor.clash == twin.instance and twin.clash == successor.instance
        assert successor.status()["hostname_clash"] == twin.instance
    finally:
        for p in made:
            p.stop()


# ---------------------------------------------------------------------------- Flower
def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def _flower(broker: Any, logdir: Path) -> Iterator[str]:
    """Real Flower on a free loopback port, reading the test broker; yields its base URL."""
    port = free_loopback_port()
    env = dict(os.environ, TEST_BROKER_URL=broker.url, TEST_QUEUE=broker.queue,
               FLOWER_UNAUTHENTICATED_API="true")
    logfile = logdir / "flower.log"
    with open(logfile, "wb") as out:
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.apps.proj", "flower", f"--port={port}",
             "--address=127.0.0.1"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_until(lambda: flower.poll() is not None or _answers(f"http://127.0.0.1:{port}/healthcheck"),
                   timeout=40, interval=0.2, message="Flower to answer")
        assert flower.poll() is None, logfile.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        flower.send_signal(signal.SIGTERM)
        try:
            flower.wait(10)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait(10)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def _scaled_up_worker(worker_factory: Any, broker: Any) -> Any:
    # adaptive_autoscale without --autoscale: Celery's Autoscaler step is off, so the table
    # comes from the pool's own consumer step (with --autoscale, from Celery's step: same data).
    worker = worker_factory("-c", "1", env=_metrics_env(TEST_AUTOSCALE="1", TEST_MIN_CHILDREN="1",
                                                       TEST_MAX_CHILDREN="3"))
    results = [broker.send("sleep", 0.3) for _ in range(12)]
    wait_until(lambda: "last-decision" in (worker.stats().get("autoscaler") or {}), timeout=30,
               message="a scale-up in inspect stats")
    for r in results:
        r.get(timeout=60)
    return worker


def test_flower_shows_the_pool_its_metrics_and_the_autoscaler_table(worker_factory, broker, tmp_path):
    worker = _scaled_up_worker(worker_factory, broker)
    with _flower(broker, tmp_path) as base:
        def stats() -> dict[str, Any] | None:
            try:
                workers = _get_json(f"{base}/api/workers?refresh=1")
            except OSError:
                return None
            found = (workers.get(worker.hostname) or {}).get("stats")
            return found if found and "autoscaler" in found else None

        found = wait_until(stats, timeout=40, interval=0.5, message="Flower to list the worker")
        pool = found["pool"]
        assert pool["implementation"] == "celery_adaptive:Pool"
        # celery-exporter counts len(stats.pool.processes): the children's pids, a list.
        assert sorted(pool["processes"]) == sorted(worker.child_pids())
        assert "metrics" in pool and "utilization" in pool["metrics"]
        table = found["autoscaler"]
        assert table["min"] == 1 and table["max"] == 3 and table["predictive"] is True
        assert {"forecast-per-second", "arrivals-per-second", "service-seconds", "backlog", "desired",
                "last-decision", "last-decision-cause"} <= set(table), table
        assert table["last-decision"].startswith("up ") and "->" not in table["last-decision"]
        assert table["last-decision-cause"] in CAUSES
        assert all(isinstance(v, (int, float, str, bool)) for v in table.values()), "flat, for humanize"

        # The page Flower renders for the worker: its "Autoscaler options" table.
        with urllib.request.urlopen(f"{base}/worker/{worker.hostname}", timeout=10) as response:
            page = response.read().decode()
        assert "Autoscaler options" in page
        for label in ("Forecast per second", "Service seconds", "Last decision cause", "Desired"):
            assert f"<td>{label}</td>" in page, label
        assert "<td>Up 1 to " in page, "the last decision, humanized by Flower"

        def event_count() -> int:
            rows = _get_json(f"{base}/workers?json=1")["data"]
            row = next((r for r in rows if r.get("hostname") == worker.hostname), {})
            return int(row.get(EVENT_TYPE, 0))

        assert wait_until(event_count, timeout=20, interval=0.5, message="Flower to count our events") > 0


def _chromium() -> str | None:
    return next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))), None)


def test_flower_worker_page_screenshot(worker_factory, broker, tmp_path):
    """Headless Chromium's screenshot of Flower's worker page, with the autoscaler table.

    Kept as docs/img/flower-autoscaler.png when ADAPTIVE_SCREENSHOT_DIR names docs/img
    (scripts/readme-images.sh). Loopback only, a fresh profile, no background traffic."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium here (apt-get install chromium); the Flower API test covers the table")
    worker = _scaled_up_worker(worker_factory, broker)
    with _flower(broker, tmp_path) as base:
        url = f"{base}/worker/{worker.hostname}"
        wait_until(lambda: _answers(url) and "Autoscaler options" in urllib.request.urlopen(url, timeout=10).read().decode(),
                   timeout=30, interval=0.5, message="Flower's page to show the autoscaler table")
        _screenshot(browser, url, tmp_path)


def _screenshot(browser: str, url: str, tmp_path: Path) -> None:
    out = tmp_path / "flower-autoscaler.png"
    profile = tmp_path / "chromium-profile"
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--window-size=1280,2700", f"--screenshot={out}", url],
        capture_output=True, text=True, timeout=120, start_new_session=True,
    )
    assert done.returncode == 0 and out.is_file(), done.stderr[-2000:]
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, "a real page, not a blank one"
    keep = os.environ.get("ADAPTIVE_SCREENSHOT_DIR")
    if keep:
        shutil.copyfile(out, Path(keep) / out.name)


# ---------------------------------------------------------------------------- Prometheus
def _listening_addresses(pid: int, port: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_prometheus_endpoint_is_loopback_and_passes_the_lint(worker_factory, broker, tmp_path):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from tests.promlint import lint

    port = free_loopback_port()
    # The memory guard with an admission threshold, on a cgroup directory of this test's
    # (4 GB limit, 1 GB in use: admission never pauses), so its families are exported too.
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("4000000000\n")
    (cgroup / "memory.current").write_text("1000000000\n")
    memory = {"adaptive_memory_cgroup": str(cgroup), "adaptive_memory_admission_threshold": "90%"}
    # The autoscaler on, held at 2 children: its forecast and decisions are exported too.
    worker = worker_factory("-c", "2", env=_metrics_env(
        TEST_METRICS_PROMETHEUS_PORT=str(port), TEST_AUTOSCALE="1", TEST_MIN_CHILDREN="2", TEST_MAX_CHILDREN="2",
        TEST_CONF_JSON=json.dumps(memory),
    ))
    assert _listening_addresses(worker.pid, port) == {"127.0.0.1"}, "the default bind is loopback only"
    assert [broker.send("add", 2, i).get(timeout=20) for i in range(3)] == [2, 3, 4]
    host = f'hostname="{worker.hostname}"'

    def scrape() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        done = f"celery_adaptive_task_succeeded_total{{{host}}} 3.0" in text
        # psutil's CPU reading needs two samples: wait for it, so every family has a sample.
        return text if done and "celery_adaptive_process_cpu_usage_ratio{" in text else None

    text = wait_until(scrape, message="the Prometheus endpoint to count the finished tasks")
    assert lint(text) == []
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert f"celery_adaptive_pool_target_processes{{{host}}} 2.0" in text
    slots = {s.labels["slot"] for s in families["celery_adaptive_process_resident_memory_bytes"].samples}
    assert slots == {"0", "1"}
    assert not any(str(pid) in text for pid in worker.child_pids()), "children are labelled by slot"
    labels = f'{host},name="tests.apps.proj.add",queue_name="{broker.queue}"'
    # Published by this test (it stamps the publish time): the whole wait is measured.
    assert f"celery_adaptive_task_queue_wait_seconds_count{{{labels}}} 3.0" in text
    assert f"celery_adaptive_task_runtime_seconds_count{{{labels}}} 3.0" in text
    assert f'celery_adaptive_pool_wait_seconds_bucket{{{host},le="+Inf"}} 3.0' in text
    assert f'celery_adaptive_autoscaler_decisions_total{{cause="steady",direction="hold",{host}}}' in text
    assert f"celery_adaptive_memory_used_bytes{{{host}}} 1e+09" in text
    assert f"celery_adaptive_memory_admission_threshold_bytes{{{host}}} 3.6e+09" in text
    assert f"celery_adaptive_memory_admission_paused{{{host}}} 0.0" in text
    # Every metric the dashboard and the alert rules read is in a real worker's scrape.
    samples = {sample.name for family in families.values() for sample in family.samples}
    monitoring = (ROOT / "monitoring" / "grafana-dashboard.json").read_text()
    monitoring += (ROOT / "monitoring" / "prometheus-rules.yml").read_text()
    assert set(re.findall(r"\bcelery_adaptive_[a-z0-9_]+", monitoring)) <= samples
    assert worker.stop() == []
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_can_be_turned_off(worker_factory, broker):
    with EventCapture(broker.app, event_type="*") as capture:
        worker = worker_factory("-c", "1", env=_metrics_env(TEST_METRICS_ENABLED="false",
                                                           TEST_METRICS_INTERVAL="0.2"))
        assert broker.send("add", 1, 1).get(timeout=20) == 2
        # Two heartbeats (2 s apart) span ten metric intervals.
        wait_until(lambda: len([e for e in capture.of(worker.hostname) if e["type"] == "worker-heartbeat"]) >= 2,
                   timeout=15, message="two heartbeats")
        assert not [e for e in capture.of(worker.hostname) if e["type"] == EVENT_TYPE]
    assert "metrics" not in worker.pool_info()
    assert not broker.redis.exists(latest_key(PREFIX, worker.hostname))


def test_snapshot_carries_the_autoscaler_forecast_and_decision(worker_factory, broker):
    worker = worker_factory("-c", "1", env=_metrics_env(TEST_AUTOSCALE="1", TEST_MIN_CHILDREN="1",
                                                       TEST_MAX_CHILDREN="3"))
    results = [broker.send("sleep", 0.3) for _ in range(20)]
    snapshot = wait_until(
        lambda: (s := _latest(broker.redis, worker.hostname))
        and (s.get("autoscaler") or {}).get("change", {}).get("direction") == "up" and s,
        timeout=30, message="a snapshot showing the scale-up",
    )
    for r in results:
        r.get(timeout=60)
    scaler = snapshot["autoscaler"]
    # The predictor's own numbers, as it computed them (not re-derived here).
    assert {"arrival_rate", "predicted_rate", "service_time", "backlog", "age_s"} <= set(scaler["forecast"])
    assert scaler["change"]["target"] > 1 and scaler["change"]["reason"].startswith("up")
    assert "decision" in scaler
    assert snapshot["pool"]["children"]["min"] == 1 and snapshot["pool"]["children"]["max"] == 3
    assert worker.pool_info()["metrics"]["last_scaling"].startswith("up")
