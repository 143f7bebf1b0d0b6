"""The pool inside a process that also talks to the broker (Celery's in-thread test worker,
``celery.contrib.testing``): the cases live in embedded_worker_cases.py and run here in a
fresh interpreter, against this session's Redis and RabbitMQ.

An in-process worker shares process-wide state with every other test in the session, both
ways: kombu's global connection pools (a connection an earlier test's broker restart killed
is handed out again), Celery's current app and its after-fork handlers, logging redirections.
Run in the session's own process, the cases failed or passed depending on what ran before.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CASES = Path(__file__).with_name("embedded_worker_cases.py")
ROOT = CASES.parent.parent.parent


def test_in_process_worker_cases(redis_url: str, request: pytest.FixtureRequest) -> None:
    env = dict(os.environ, REDIS_URL=redis_url)
    try:
        env["AMQP_URL"] = request.getfixturevalue("amqp_url")
    except pytest.skip.Exception:
        env.pop("AMQP_URL", None)  # the cases skip their RabbitMQ half themselves, saying why
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(CASES)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    print(done.stdout.splitlines()[-1] if done.stdout else "")
