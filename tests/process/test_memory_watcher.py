"""The memory watcher on real processes: what it reads, what it skips, and that a task start
wakes it from its idle pace (no Celery: children are plain processes it knows by pid)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from celery_adaptive.clock import MonotonicClock
from celery_adaptive.memory.cgroup import SystemMemorySource
from celery_adaptive.memory.sample import MemorySample
from celery_adaptive.memory.watcher import MemoryWatcher
from celery_adaptive.supervisor import Child, ChildState
from tests.support import wait_until


@pytest.fixture
def process() -> Iterator[subprocess.Popen[bytes]]:
    """A process holding ~30 MiB (touched), until the test ends."""
    code = "import sys,time; b=bytearray(30*2**20); b[::4096]=b'x'*len(b[::4096]); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    yield proc
    proc.kill()
    proc.wait(10)


def _child(child_id: int, pid: int, state: ChildState, tasks_done: int = 0) -> Child:
    return Child(child_id, child_id, None, pid, None, None, 0.0, state=state, tasks_done=tasks_done)


def test_it_reads_ready_children_by_pid_and_skips_the_rest(process) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    children = [
        _child(1, process.pid, ChildState.BUSY, tasks_done=7),
        _child(2, process.pid, ChildState.STARTING),  # not ready: not read
        _child(3, dead.pid, ChildState.IDLE),  # gone: no reading, no error
    ]
    watcher = MemoryWatcher(lambda: children, lambda s: None, SystemMemorySource.from_setting("host"),
                            0.05, MonotonicClock())
    wait_until(lambda: _big_enough(watcher.sample_once()), 10, message="the process to hold 30 MiB")
    sample = watcher.sample_once()
    (reading,) = sample.children
    assert (reading.child_id, reading.pid, reading.tasks_done) == (1, process.pid, 7)
    assert reading.rss >= 30 * 2**20
    if reading.uss is not None:  # where smaps can be read
        assert 0 < reading.uss <= reading.rss
    assert sample.system is not None and sample.system.source == "host"


def _big_enough(sample: MemorySample) -> bool:
    return bool(sample.children) and sample.children[0].rss >= 30 * 2**20


def test_a_task_start_wakes_the_idle_watcher(process) -> None:
    children = [_child(1, process.pid, ChildState.IDLE)]
    samples: list[MemorySample] = []
    watcher = MemoryWatcher(lambda: children, samples.append, None, 0.05, MonotonicClock(),
                            idle_interval=60.0)
    watcher.start()
    try:
        wait_until(lambda: len(samples) == 1, 10, message="the first reading")
        # Idle children: the next reading would be a minute away, unless a task starts.
        wait_until(lambda: watcher._idle, 10, message="the watcher to wait at its idle pace")
        watcher.poke()
        wait_until(lambda: len(samples) >= 2, 10, message="a reading right after the poke")
    finally:
        watcher.stop()
    assert watcher._thread is not None and not watcher._thread.is_alive()
