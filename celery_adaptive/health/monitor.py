"""The worker's health, kept by the pool and read by probes (see the package docstring).

Threads::

    event loop (L)                                   health thread         HTTP thread
    ──────────────                                   ─────────────         ───────────
    consumer_started / consumer_stopped  ─┐
    hub timer every interval: _turn ──────┴─> two plain fields ─> status() ─> status file
    (the time of the turn)                                         status() ─> /healthz /readyz
                               serving_count() (a snapshot of the children) ─┘

L writes single attributes (atomic in CPython); the other threads only read them, and count
the serving children from the supervisor's thread-safe snapshot. Nothing here blocks L: the
file is written by the health thread. A worker without an event loop (a transport that has
none) cannot be watched that way: it is alive while consuming.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("celery_adaptive.health")

STATUS_DIR = "celery-adaptive-health"


def default_status_file(hostname: str) -> Path:
    """``<tmp>/celery-adaptive-health/<hostname>.json`` (the worker's and the command's default)."""
    safe = re.sub(r"[^\w@.+-]", "_", hostname) or "worker"
    return Path(tempfile.gettempdir()) / STATUS_DIR / f"{safe}.json"


@dataclass(frozen=True)
class HealthStatus:
    alive: bool
    ready: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class HealthMonitor:
    def __init__(
        self,
        hostname: str,
        *,
        interval: float,
        timeout: float,
        status_file: Path | None,
        serving_count: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be > 0")
        self.hostname = hostname
        self.interval = interval
        self.timeout = timeout
        self.status_file = status_file
        self._clock = clock
        # Written on L only:
        self._consuming_since: float | None = None
        self._last_turn: float | None = None
        self._watch_loop = True
        self._serving_count = serving_count
        self._timer: Any = None
        # The health thread:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file_failed = False

    # ------------------------------------------------------------------ L
    def consumer_started(self, event_loop: bool = True) -> None:
        """The consumer (re)started: the loop has ``timeout`` seconds to start turning.
        ``event_loop`` False: the worker runs without one, and there is no loop to watch."""
        self._watch_loop = event_loop
        self._consuming_since = self._clock()

    def consumer_stopped(self) -> None:
        """Connection lost, restart or shutdown: not consuming until the next start."""
        self._consuming_since = None

    def attach(self, hub: Any) -> None:
        """Turn with the hub (called on every consumer start; hub timers do not survive a
        reconnect, so the previous one is replaced)."""
        if self._timer is not None:
            try:
                self._timer.cancel()
            except Exception:
                pass
        self._timer = hub.call_repeatedly(self.interval, self._turn)
        self._turn()

    def _turn(self) -> None:
        self._last_turn = self._clock()

    # ------------------------------------------------------------------ any thread
    def status(self) -> HealthStatus:
        now = self._clock()
        since = self._consuming_since
        if since is None:
            return HealthStatus(True, False, "not consuming: starting, connecting to the broker, or stopping")
        serving = self._serving_count()
        if not self._watch_loop:
            if serving < 1:
                return HealthStatus(True, False, "no child is serving yet")
            return HealthStatus(True, True, f"consuming (no event loop to watch) with {serving} serving child(ren)")
        turned = self._last_turn
        last = since if turned is None or turned < since else turned
        quiet = now - last
        if quiet > self.timeout:
            return HealthStatus(False, False, f"the event loop has not turned for {quiet:.1f} s "
                                              f"(limit {self.timeout:g} s)")
        if turned is None or turned < since:
            return HealthStatus(True, False, "consumer started; waiting for the event loop")
        if serving < 1:
            return HealthStatus(True, False, "no child is serving yet")
        return HealthStatus(True, True, f"consuming with {serving} serving child(ren)")

    # ------------------------------------------------------------------ the health thread
    def start(self) -> None:
        if self.status_file is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="adaptive-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Idempotent; removes the status file (a stopped worker is neither alive nor ready)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(1.0)
        if self._timer is not None:
            try:
                self._timer.cancel()
            except Exception:
                pass
        if self.status_file is not None:
            try:
                self.status_file.unlink()
            except OSError:
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self.write_status_file()
            self._stop.wait(self.interval)

    def write_status_file(self) -> None:
        path = self.status_file
        if path is None:
            return
        record = {
            "hostname": self.hostname,
            "pid": os.getpid(),
            "written_at": time.monotonic(),  # CLOCK_MONOTONIC: the same for every process on the host
            "valid_for": self.timeout,
            **self.status().to_dict(),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError as exc:
            if not self._file_failed:
                logger.warning("Cannot write the health status file %s (%s); `celery adaptive health` "
                               "will report this worker down", path, exc)
            self._file_failed = True
            return
        self._file_failed = False


def read_status_file(path: Path, live: bool, now: float | None = None) -> tuple[bool, str]:
    """What ``celery adaptive health`` decides from a status file: (healthy, one line why)."""
    try:
        record = json.loads(path.read_text())
        written_at, valid_for = float(record["written_at"]), float(record["valid_for"])
    except FileNotFoundError:
        return False, f"no status file at {path}: no worker with this hostname runs here"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"unreadable status file {path}: {exc}"
    age = (time.monotonic() if now is None else now) - written_at
    if age > valid_for:
        return False, (f"the status file is {age:.1f} s old (limit {valid_for:g} s): the worker "
                       f"process (pid {record.get('pid')}) is stopped or gone")
    healthy = bool(record.get("alive" if live else "ready"))
    what = "alive" if live else "ready"
    return healthy, f"{'' if healthy else 'not '}{what}: {record.get('reason', '')}"
