"""A private, real RabbitMQ for the tests, on free loopback ports.

``EmbeddedRabbitMQ`` runs the system's ``rabbitmq-server`` (the Erlang distribution's own
script, not the Debian wrapper that switches to the ``rabbitmq`` user) with everything in a
temporary directory: its database, logs, config, enabled-plugins file (empty: no management
plugin), Erlang cookie and a private ``epmd``. The AMQP listener, the Erlang distribution port
and epmd listen on 127.0.0.1 only, each on a free port, and the node name is unique, so the
server clashes neither with a RabbitMQ already on the machine nor with a parallel test run.
The server boots with a session vhost (``default_vhost``), and everything is stopped by pid.

Data flow: pytest (tests/conftest.py ``amqp_url``) -> start() -> epmd, then rabbitmq-server
(a shell that forwards SIGTERM to the Erlang VM) -> poll an AMQP connection until it answers
(bounded) -> tests -> stop(): SIGTERM to the script, then to epmd; SIGKILL after a bound.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psutil
from kombu import Connection

from celery_adaptive.embedded_redis import free_loopback_port

# The Erlang distribution's scripts. Debian's /usr/sbin/rabbitmq-server is a wrapper that runs
# them as the `rabbitmq` user, which could not write our temporary directory.
DISTRIBUTION_SBIN = Path("/usr/lib/rabbitmq/bin")


class RabbitMQUnavailable(RuntimeError):
    """No rabbitmq-server could be found or started."""


def amqp_answers(url: str, timeout: float = 1.0) -> bool:
    """True if an AMQP server accepts a connection (and login, and vhost) at ``url``."""
    try:
        with Connection(url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
            return True
    except Exception:  # any refusal means "not usable": wrong port, login, vhost, protocol
        return False


def find_rabbitmq_server() -> Path:
    """The rabbitmq-server script: $RABBITMQ_SERVER, the Debian/Ubuntu package's, then PATH."""
    candidates: list[Path] = []
    explicit = os.environ.get("RABBITMQ_SERVER")
    if explicit:
        candidates.append(Path(explicit))
    candidates.append(DISTRIBUTION_SBIN / "rabbitmq-server")
    on_path = shutil.which("rabbitmq-server")
    if on_path:
        candidates.append(Path(on_path).resolve())
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK) and not _is_user_switching_wrapper(candidate):
            return candidate
    raise RabbitMQUnavailable(
        "no rabbitmq-server found (apt-get install rabbitmq-server, or set AMQP_URL to a "
        "running server, or RABBITMQ_SERVER to the script's path)"
    )


def _is_user_switching_wrapper(script: Path) -> bool:
    try:
        return "su rabbitmq" in script.read_text(errors="replace")
    except OSError:
        return True


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    for _ in range(20 * count):  # the kernel may hand the same free port out twice in a row
        port = free_loopback_port()
        if port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RabbitMQUnavailable(f"could not find {count} distinct free loopback ports")


def _port_listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedRabbitMQ:
    """Context manager owning one rabbitmq-server and its epmd.

    >>> with EmbeddedRabbitMQ() as server:
    ...     server.url  # amqp://guest:guest@127.0.0.1:PORT/celery-adaptive-XXXXXXXX
    """

    def __init__(self, start_timeout: float = 90.0, stop_timeout: float = 30.0) -> None:
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.vhost = f"celery-adaptive-{secrets.token_hex(4)}"
        self.nodename = f"ca-{secrets.token_hex(4)}@localhost"
        self.port = 0
        self.startup_seconds: float | None = None
        self._workdir: Path | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._vms: list[psutil.Process] = []
        self._script: Path | None = None
        self._env: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{self.vhost}"

    def start(self) -> EmbeddedRabbitMQ:
        script = find_rabbitmq_server()
        started = time.monotonic()
        self._workdir = Path(tempfile.mkdtemp(prefix="celery-adaptive-rabbitmq-"))
        self.port, dist_port, epmd_port = _distinct_free_ports(3)
        env = self._environment(dist_port, epmd_port)
        self._script, self._env = script, env
        try:
            self._start_epmd(env, epmd_port)
            with open(self._workdir / "server.out", "wb") as out:
                self._server = subprocess.Popen(
                    [str(script)], env=env, cwd=self._workdir, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
            self._wait_until_it_answers(script)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _environment(self, dist_port: int, epmd_port: int) -> dict[str, str]:
        assert self._workdir is not None
        work = self._workdir
        (work / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"default_vhost = {self.vhost}\n"
            "disk_free_limit.absolute = 50MB\n"
            "collect_statistics = none\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        (work / "enabled_plugins").write_text("[].\n")
        (work / "rabbitmq-env.conf").write_text("")  # instead of /etc/rabbitmq/rabbitmq-env.conf
        cookie = work / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        # Inherited RABBITMQ_*/ERL_* settings (a node name, ERL_FLAGS) would reach this server.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(work),  # the Erlang cookie lives in $HOME
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "ERL_EPMD_PORT": str(epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CONF_ENV_FILE": str(work / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(work / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(work / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(work / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(work / "mnesia"),
            "RABBITMQ_LOG_BASE": str(work / "log"),
            "RABBITMQ_PID_FILE": str(work / "rabbitmq.pid"),
        })
        return env

    def _start_epmd(self, env: dict[str, str], port: int) -> None:
        # Our own epmd in the foreground: one the Erlang VM started itself would daemonize and
        # outlive the session, and the machine's shared one may not exist.
        epmd = shutil.which("epmd") or "epmd"
        try:
            self._epmd = subprocess.Popen(
                [epmd, "-port", str(port), "-address", "127.0.0.1"], env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise RabbitMQUnavailable(f"could not run epmd (Erlang's port mapper): {exc}") from exc
        deadline = time.monotonic() + 10
        while not _port_listens(port):
            if self._epmd.poll() is not None or time.monotonic() > deadline:
                raise RabbitMQUnavailable(f"epmd did not listen on 127.0.0.1:{port}")
            time.sleep(0.05)

    def _wait_until_it_answers(self, script: Path) -> None:
        assert self._server is not None
        deadline = time.monotonic() + self.start_timeout
        while not amqp_answers(self.url, timeout=0.5):
            if self._server.poll() is not None:
                raise RabbitMQUnavailable(f"{script} exited at start (code {self._server.returncode}):"
                                          f"\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RabbitMQUnavailable(f"{script} did not answer on 127.0.0.1:{self.port} in "
                                          f"{self.start_timeout}s:\n{self.output()[-3000:]}")
            self._note_vm()
            time.sleep(0.2)
        self._note_vm()

    def _note_vm(self) -> None:
        """Remember the Erlang VM (a child of the script): if the script dies without stopping
        it, it is killed by pid (psutil checks the pid was not reused)."""
        assert self._server is not None
        try:
            kids = psutil.Process(self._server.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for kid in kids:
            try:
                if kid.name().startswith("beam") and kid not in self._vms:
                    self._vms.append(kid)
            except psutil.NoSuchProcess:
                pass

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl`` against this node (e.g. ``close_all_connections``); its stdout."""
        if self._script is None or self._server is None:
            raise RabbitMQUnavailable("the server is not running")
        done = subprocess.run(
            [str(self._script.with_name("rabbitmqctl")), "-n", self.nodename, *args],
            env=self._env, cwd=self._workdir, capture_output=True, text=True, timeout=timeout,
        )
        if done.returncode != 0:
            raise RabbitMQUnavailable(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def output(self) -> str:
        """The server's console output and log file, for error messages."""
        if self._workdir is None:
            return ""
        parts = []
        for path in [self._workdir / "server.out", *sorted((self._workdir / "log").glob("*.log"))]:
            try:
                parts.append(path.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(parts)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # The script traps SIGTERM and stops the VM (a clean shutdown, about a second).
            _terminate(server, self.stop_timeout)
        for vm in self._vms:  # only left if the clean shutdown did not happen
            try:
                if vm.is_running() and vm.status() != psutil.STATUS_ZOMBIE:
                    vm.kill()
            except psutil.NoSuchProcess:
                pass
        self._vms = []
        epmd, self._epmd = self._epmd, None
        if epmd is not None:
            _terminate(epmd, 5)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> EmbeddedRabbitMQ:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            process.kill()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
