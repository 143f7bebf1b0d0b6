"""Start and stop one ``celery worker`` subprocess that this harness owns.

The worker runs in its own session (``start_new_session=True``), so its process group contains
only it and its children; stopping sends SIGTERM to our pid, waits, then SIGKILLs that group.
Readiness is a bounded series of ``control.ping`` calls to the worker's unique hostname.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO

from celery import Celery

from bench.cgroup import MemoryBudget
from bench.pools import PoolConfig
from bench.tasks import BACKEND_ENV, BROKER_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_ARGS = ("--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning")


class WorkerStartError(RuntimeError):
    """The message is one line for the summary; the log tail goes into the run record."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail


def worker_command(pool: PoolConfig, hostname: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "bench.tasks", "worker", *pool.args,
            "-n", hostname, *BASE_ARGS]


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace")


class Worker:
    """One worker subprocess; use as a context manager so it is always stopped."""

    def __init__(self, pool: PoolConfig, broker_url: str, backend_url: str, log_path: Path,
                 start_timeout: float = 60.0, stop_timeout: float = 20.0,
                 budget: MemoryBudget | None = None) -> None:
        self.pool = pool
        self.budget = budget
        self.broker_url = broker_url
        self.backend_url = backend_url
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        # No '%h': the name must be known exactly to address the ping.
        self.hostname = f"bench-{pool.slug}-{uuid.uuid4().hex[:8]}@bench"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("worker not started")
        return self.process.pid

    def start(self, client: Celery) -> None:
        env = {**os.environ, **self.pool.env, BROKER_ENV: self.broker_url,
               BACKEND_ENV: self.backend_url, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH"))
                                            if p)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in stop()
        self._log.write(f"$ {' '.join(worker_command(self.pool, self.hostname))}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            worker_command(self.pool, self.hostname), cwd=REPO_ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.budget is not None:
            # Before the worker forks its pool: it is still importing (a second or more).
            self.budget.add(self.process.pid)
        self._wait_ready(client)

    def _wait_ready(self, client: Celery) -> None:
        deadline = time.monotonic() + self.start_timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise WorkerStartError(
                    f"worker exited with code {self.process.returncode} before it was ready",
                    _tail(self.log_path))
            replies = client.control.ping(destination=[self.hostname], timeout=0.5)
            if any(self.hostname in reply for reply in replies or []):
                return
        raise WorkerStartError(f"worker did not answer ping within {self.start_timeout}s",
                               _tail(self.log_path))

    def stop(self) -> int | None:
        """Warm shutdown, then SIGKILL of our process group. Returns the exit code if any."""
        process, self.process = self.process, None
        code: int | None = None
        if process is not None:
            try:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        code = process.wait(timeout=self.stop_timeout)
                    except subprocess.TimeoutExpired:
                        pass
                else:
                    code = process.returncode
            finally:
                # Children that outlived the parent (or a parent that hung) are in the group we
                # created; nothing else is.
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                if code is None:
                    try:
                        code = process.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        code = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log_tail(self) -> str:
        return _tail(self.log_path)
