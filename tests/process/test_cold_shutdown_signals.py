"""Cold shutdown from a signal handler never hangs, wherever the signal lands.

Celery stops the pool from its signal handlers. The earlier supervisor could be interrupted
inside a non-reentrant lock (its timer heap) and then wait on that same lock from the handler:
3 hangs in ~32 trials. Here a timer signal lands at random points of a loop of `call_later`,
`submit` and housekeeping on a supervisor with a real child, and its handler runs the cold
stop, 200 times; each must end within its bound.
"""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import sys
import time
from typing import Any

import billiard
import pytest

from celery_adaptive.child import ChildSpec, child_main
from celery_adaptive.jobs import Job
from celery_adaptive.scheduler import Scheduler
from celery_adaptive.settings import build_settings
from celery_adaptive.supervisor import ProcessLauncher, Supervisor

CTX = billiard.get_context("fork")
TRIALS = int(os.environ.get("COLD_STOP_TRIALS", "200"))
#: terminate() waits at most 2 s for kills to be reaped, plus bookkeeping.
BOUND_S = 8.0


def _noop() -> int:
    return 1


def _job(sup: Supervisor) -> Job:
    return Job(sup.new_job_id(), _noop, (), {}, callback=None, error_callback=None,
               accept_callback=None, timeout_callback=None, soft_timeout=None, hard_timeout=None,
               correlation_id="c", task_name="noop", affinity_key=None, submitted_at=sup.clock.now())


def _supervisor() -> Supervisor:
    settings = build_settings({}, {"limit": 1})
    return Supervisor(
        settings, lambda slot: ChildSpec(slot, None, (None, None), None, None, "fork", ()),
        ProcessLauncher(CTX, _bare_child, 1 << 20), Scheduler(),
    )


def _bare_child(inbox: Any, outbox: Any, spec: ChildSpec, inherited: tuple[int, ...]) -> None:
    # child_main without Celery's process initializer (no app here).
    import celery.concurrency.prefork as prefork

    prefork.process_initializer = lambda *a, **k: None
    child_main(inbox, outbox, spec, inherited)


@pytest.mark.slow
def test_cold_stop_from_a_signal_handler_never_hangs() -> None:
    rng = random.Random(20261202)
    worst = 0.0
    faulthandler.dump_traceback_later(BOUND_S * TRIALS, exit=True, file=sys.stderr)
    try:
        for _trial in range(TRIALS):
            sup = _supervisor()
            sup.start()
            ended: list[float] = []

            def handler(signum: int, frame: Any, sup: Supervisor = sup, ended: list[float] = ended) -> None:
                began = time.monotonic()
                sup.terminate()
                ended.append(time.monotonic() - began)  # then returns, as Celery's handler does

            previous = signal.signal(signal.SIGALRM, handler)
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0005, 0.02))
            try:
                for _ in range(100_000):
                    if ended:
                        break
                    sup.call_later(rng.uniform(0, 0.01), lambda: None, "noise")
                    sup.submit(_job(sup))
                    sup.maintain()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
            sup.terminate()  # idempotent; also covers a signal that never landed
            assert ended, "the loop ended before the signal"
            worst = max(worst, ended[0])
            assert ended[0] < BOUND_S
            assert not [c for c in sup.children() if c.process.is_alive()]
    finally:
        faulthandler.cancel_dump_traceback_later()
    print(f"worst cold stop from a signal handler: {worst * 1000:.0f} ms over {TRIALS} trials")
