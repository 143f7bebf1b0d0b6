"""Soak: many acks_late tasks while children are killed and the pool is resized at random.

Size with $SOAK_TASKS (default 4000, under a minute here; the long mode is
``SOAK_TASKS=100000 scripts/test.sh tests/integration/test_soak.py``).
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid

import psutil
import pytest

from tests.support import wait_until

SOAK_TASKS = int(os.environ.get("SOAK_TASKS", "4000"))

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.timeout(int(300 + SOAK_TASKS / 10))]


def _lists(broker, prefix: str, tokens: list[str]) -> list[list[bytes]]:
    pipe = broker.redis.pipeline(transaction=False)
    for token in tokens:
        pipe.lrange(f"{prefix}:{token}", 0, -1)
    return pipe.execute()


def test_soak_with_kills_and_resizes(worker_factory, broker):
    worker = worker_factory("-c", "3")
    rng = random.Random(11)
    tokens = [uuid.uuid4().hex for _ in range(SOAK_TASKS)]
    killed: set[int] = set()
    parent = psutil.Process(worker.pid)
    warm_rss: int | None = None
    kill_every = max(20, SOAK_TASKS // 30)
    deadline = time.monotonic() + max(300, SOAK_TASKS / 20)
    for i, token in enumerate(tokens):
        broker.send("record", token, rng.choice((0.0, 0.0, 0.002, 0.01)))
        if i and i % kill_every == 0:
            pids = worker.child_pids()
            if pids:
                victim = rng.choice(pids)
                killed.add(victim)
                try:
                    os.kill(victim, signal.SIGKILL)  # a child of the worker this test started
                except ProcessLookupError:
                    pass
        if i and i % (kill_every * 2) == kill_every // 2:
            target = worker.pool_info()["target"]
            grow = target <= 2 or (target < 5 and rng.random() < 0.5)
            worker.control("pool_grow" if grow else "pool_shrink", n=1)
        if i == len(tokens) // 5:
            time.sleep(1.0)
            warm_rss = parent.memory_info().rss
        if i % 200 == 0:
            assert time.monotonic() < deadline, "soak sender ran out of time"
            time.sleep(0.05)  # keep the backlog bounded
    wait_until(lambda: all(_lists(broker, "done", tokens[-50:])), timeout=deadline - time.monotonic(),
               interval=0.5, message="the last tasks done")
    wait_until(lambda: all(_lists(broker, "done", tokens)), timeout=120, interval=1.0,
               message="every task done")
    runs = _lists(broker, "runs", tokens)
    done = _lists(broker, "done", tokens)
    reruns = 0
    for token, ran, finished in zip(tokens, runs, done, strict=True):
        assert len(finished) >= 1, token
        if len(finished) > 1:
            # Finished twice only if the child was killed after the body ended but before the
            # pool reported it (so Celery never acked it): that child is among the killed.
            assert {int(p) for p in finished[:-1]} <= killed, (token, finished, killed)
        if len(ran) > 1:
            reruns += 1
            # It ran more than once only because a child was killed while running it.
            assert {int(p) for p in ran[:-1]} <= killed, (token, ran, killed)
    assert reruns <= len(killed)
    assert worker.alive()
    wait_until(lambda: len(worker.child_pids()) == worker.pool_info()["target"], message="full strength")
    assert warm_rss is not None
    growth = parent.memory_info().rss - warm_rss
    assert growth < 40 * 1024 * 1024, f"worker parent grew by {growth / 2**20:.1f} MiB"
    print(f"soak: {len(tokens)} tasks, {len(killed)} kills, {reruns} reruns, "
          f"parent RSS growth {growth / 2**20:.1f} MiB")
