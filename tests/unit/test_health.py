"""The health monitor's decisions on a fake clock, and what the exec probe reads."""

from __future__ import annotations

import json
import time
from pathlib import Path

from celery_adaptive.health.monitor import HealthMonitor, default_status_file, read_status_file


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Hub:
    def __init__(self) -> None:
        self.calls: list[tuple[float, object]] = []

    def call_repeatedly(self, interval: float, fun: object) -> object:
        self.calls.append((interval, fun))
        return self


def _monitor(clock: Clock, tmp_path: Path | None = None, serving: list[int] | None = None) -> HealthMonitor:
    path = tmp_path / "h.json" if tmp_path is not None else None
    count = serving if serving is not None else [1]
    return HealthMonitor("celery@h", interval=1.0, timeout=10.0, status_file=path, clock=clock,
                         serving_count=lambda: count[0])


def test_alive_not_ready_until_consuming_with_a_child():
    clock, hub, serving = Clock(), Hub(), [0]
    monitor = _monitor(clock, serving=serving)
    assert (monitor.status().alive, monitor.status().ready) == (True, False)  # starting
    monitor.consumer_started()
    clock.now += 5  # the loop has not turned yet, within the timeout
    assert (monitor.status().alive, monitor.status().ready) == (True, False)
    monitor.attach(hub)
    assert hub.calls[0][0] == 1.0
    assert monitor.status().reason == "no child is serving yet"
    serving[0] = 2
    monitor._turn()
    assert monitor.status().ready and "2 serving" in monitor.status().reason


def test_a_quiet_loop_is_not_alive_but_a_reconnecting_consumer_is():
    clock, hub = Clock(), Hub()
    monitor = _monitor(clock)
    monitor.consumer_started()
    monitor.attach(hub)
    clock.now += 10.5
    status = monitor.status()
    assert not status.alive and not status.ready and "has not turned for 10.5 s" in status.reason
    monitor.consumer_stopped()  # connection lost: Celery reconnects (the loop does not run)
    clock.now += 600
    assert (monitor.status().alive, monitor.status().ready) == (True, False)
    monitor.consumer_started()  # a turn from before the restart does not make it ready
    assert monitor.status().reason == "consumer started; waiting for the event loop"
    clock.now += 11
    assert not monitor.status().alive  # the loop never started after the restart


def test_the_status_file_and_its_reader(tmp_path):
    clock = Clock()
    monitor = _monitor(clock, tmp_path)
    monitor.consumer_started()
    monitor.attach(Hub())
    monitor.write_status_file()
    path = tmp_path / "h.json"
    record = json.loads(path.read_text())
    assert record["ready"] is True and record["hostname"] == "celery@h" and record["valid_for"] == 10.0
    assert read_status_file(path, live=False) == (True, "ready: consuming with 1 serving child(ren)")
    assert read_status_file(path, live=True)[0]
    stale = read_status_file(path, live=True, now=time.monotonic() + 11)
    assert not stale[0] and "stopped or gone" in stale[1]
    monitor.stop()
    assert not path.exists()
    assert read_status_file(path, live=True)[1].startswith("no status file")
    path.write_text("{not json")
    assert read_status_file(path, live=True)[1].startswith("unreadable status file")


def test_default_status_file_is_per_hostname():
    a, b = default_status_file("celery@web-1"), default_status_file("celery@web-2")
    assert a != b and a.parent == b.parent and a.name == "celery@web-1.json"
    assert "/" not in default_status_file("a/b@c").name


def test_without_an_event_loop_it_is_alive_while_consuming():
    clock, serving = Clock(), [0]
    monitor = _monitor(clock, serving=serving)
    monitor.consumer_started(event_loop=False)
    clock.now += 3600
    assert (monitor.status().alive, monitor.status().ready) == (True, False)
    serving[0] = 1
    assert monitor.status().ready and "no event loop to watch" in monitor.status().reason
