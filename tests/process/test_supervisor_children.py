"""The supervisor with real child processes but no Celery worker: misbehaving children."""

from __future__ import annotations

import os
import time
from typing import Any

import billiard
import psutil
import pytest

from celery_adaptive import protocol
from celery_adaptive.child import ChildSpec
from celery_adaptive.protocol import ChildReady
from celery_adaptive.scheduler import Scheduler
from celery_adaptive.settings import build_settings
from celery_adaptive.supervisor import ProcessLauncher, Supervisor
from tests.support import wait_until

CTX = billiard.get_context("fork")


def garbage_child(inbox: Any, outbox: Any, spec: ChildSpec, inherited: tuple[int, ...]) -> None:
    outbox.send_bytes(protocol.encode(ChildReady(os.getpid(), None)))
    outbox.send_bytes(b"definitely not a protocol message")
    time.sleep(30)


def dies_at_start(inbox: Any, outbox: Any, spec: ChildSpec, inherited: tuple[int, ...]) -> None:
    os._exit(3)


def _supervisor(target: Any, children: int = 1) -> Supervisor:
    settings = build_settings({}, {"limit": children})

    def spec(slot: int) -> ChildSpec:
        return ChildSpec(slot, None, (), None, None, "fork", ())

    return Supervisor(settings, spec, ProcessLauncher(CTX, target, 1 << 20), Scheduler())


def _own_children() -> set[int]:
    alive = set()
    for p in psutil.Process().children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.add(p.pid)
        except psutil.NoSuchProcess:  # exited between the listing and the read
            pass
    return alive


def test_child_sending_garbage_is_replaced():
    before = _own_children()
    sup = _supervisor(garbage_child)
    sup.start()
    try:
        wait_until(lambda: sup.counters["children_started"] >= 3, timeout=20, message="replacements")
        assert sup.counters["children_crashed"] >= 2
        assert len(sup.live_children()) <= 1
    finally:
        sup.terminate()
    wait_until(lambda: _own_children() <= before, timeout=10, message="no leaked child")


def test_child_dying_at_start_backs_off_instead_of_looping():
    before = _own_children()
    sup = _supervisor(dies_at_start, children=2)
    sup.start()
    try:
        time.sleep(1.5)
        # With 0.1 s doubling back-off, 1.5 s allows a handful of attempts, not hundreds.
        assert 2 <= sup.counters["children_started"] <= 12, sup.counters
        assert not sup.did_start_ok() or sup.live_children()
    finally:
        sup.terminate()
    wait_until(lambda: _own_children() <= before, timeout=10, message="no leaked child")


def test_terminate_is_idempotent():
    sup = _supervisor(garbage_child)
    sup.start()
    sup.terminate()
    sup.terminate()
    with pytest.raises(ValueError):
        sup.shrink(1)
