"""The docker-compose stack, without Docker.

The compose file is validated against the Compose specification's JSON schema, then each service
built from our Dockerfile is run here as the container would run it: the same command and
environment, the image's working directory and PYTHONPATH (the repository root stands in for
/app), the worker's `cpuset` applied as its CPU affinity, and the `redis` service replaced by the
test Redis on loopback (its own database, so nothing else on it sees this stack). The other
changes, each for a reason: `celery`/`python` are this interpreter's, Flower listens on a free
loopback port instead of 5555, the load generator runs one round, beat fires every second and
keeps its schedule file in the test's directory.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from celery import Celery
from celery.utils.nodenames import host_format

from example_project.load import TENANT, TaskCall, mixed_batch, send_call
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
# A copy kept in the repository (Apache-2.0, see tests/data/compose-spec/README.md).
SCHEMA = ROOT / "tests" / "data" / "compose-spec" / "compose-spec.json"
COMPOSE_BROKER = "redis://redis:6379/0"
APP_SERVICES = {"worker", "flower", "loadgen", "beat"}
STACK_DB = 9
# Variables the container would not inherit from this machine.
FOREIGN_ENV = ("CELERY_", "FLOWER_", "LOADGEN_", "ADAPTIVE_", "BURST_", "AUTOSCALE_")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_file_validates_against_the_spec(compose):
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["comand"] = broken["services"]["worker"].pop("command")
    assert list(validator.iter_errors(broken)), "the schema accepts a misspelt key: not the real one?"


def test_stack_has_what_the_issue_asks_for(compose):
    services = compose["services"]
    assert set(services) == {"redis"} | APP_SERVICES
    assert services["redis"]["image"].startswith("redis:7")
    worker = services["worker"]
    assert worker["command"][:6] == ["celery", "-A", "example_project", "worker", "-P", "celery_adaptive:Pool"]
    assert worker.get("cpuset"), "the worker needs a cpuset so pinning means something"
    assert any(str(p).endswith("5555:5555") for p in services["flower"]["ports"])
    assert "--port=5555" in services["flower"]["command"]
    for name in APP_SERVICES:
        assert services[name]["build"] == ".", name
        assert services[name]["environment"]["CELERY_BROKER_URL"] == COMPOSE_BROKER, name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    assert "profiles" in services["beat"], "beat is optional: it must not start by default"
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    assert re.search(r"^RUN pip install \. ", dockerfile, re.M)
    # The mapping these tests rely on: /app in the image is the repository root here.
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)
    assert re.search(r"^ENV PYTHONPATH=/app$", dockerfile, re.M)


# ---------------------------------------------------------------------------- running services


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpus(cpuset: str) -> set[int]:
    cpus: set[int] = set()
    for part in cpuset.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


@dataclass
class Service:
    """One compose service run as a local process in its own session; stopped by pid."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    cpus: set[int] | None = None
    popen: subprocess.Popen[bytes] | None = None
    seen: dict[int, float] = field(default_factory=dict)

    def start(self) -> Service:
        cpus = self.cpus

        def pin() -> None:  # what `cpuset` does to the container
            if cpus:
                os.sched_setaffinity(0, cpus)

        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=pin if cpus else None)
        self.track()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def track(self) -> None:
        try:
            procs = [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                self.seen.setdefault(proc.pid, proc.create_time())
            except psutil.Error:
                continue

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s:\n{self.text()[-3000:]}") from None

    def stop(self, timeout: float = 30.0) -> list[str]:
        """SIGTERM (what `docker compose stop` sends), SIGKILL after ``timeout``; the processes
        of this service still running afterwards, killed and returned."""
        if self.popen is None:
            return []
        if self.alive():
            self.track()
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        leaked = []
        deadline = time.monotonic() + 10
        for pid, created in self.seen.items():
            while time.monotonic() < deadline:
                try:
                    proc = psutil.Process(pid)
                    if proc.create_time() != created or proc.status() == psutil.STATUS_ZOMBIE:
                        break
                except psutil.Error:
                    break
                time.sleep(0.05)
            else:
                leaked.append(f"{self.name}: pid {pid}")
                try:
                    psutil.Process(pid).kill()
                except psutil.Error:
                    pass
        return leaked


@dataclass
class Stack:
    compose: dict[str, Any]
    broker: str
    logdir: Path
    services: list[Service] = field(default_factory=list)
    flower_port: int = 0

    def command(self, name: str, extra_env: dict[str, str] | None = None) -> Service:
        spec = self.compose["services"][name]
        argv = list(spec["command"])
        argv = ([sys.executable, "-m", "celery"] + argv[1:] if argv[0] == "celery"
                else [sys.executable] + argv[1:] if argv[0] == "python" else argv)
        env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
        for key, value in (spec.get("environment") or {}).items():
            value = str(value)
            if COMPOSE_BROKER in value:
                value = value.replace(COMPOSE_BROKER, self.broker)
            assert "redis:6379" not in value, f"{name}: {key}={value} still points at the compose network"
            env[key] = value
        env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})  # the image's ENV
        env.update(extra_env or {})
        cpus = None
        if spec.get("cpuset"):
            cpus = _cpus(str(spec["cpuset"])) & os.sched_getaffinity(0) or None
        service = Service(name, argv, env, self.logdir / f"{name}-{uuid.uuid4().hex[:6]}.log", cpus)
        self.services.append(service)
        return service

    def stop_all(self) -> list[str]:
        leaked: list[str] = []
        for service in reversed(self.services):
            leaked.extend(service.stop())
        return leaked


def _stack_broker(redis_url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(redis_url)._replace(path=f"/{STACK_DB}"))


def _flower_workers(port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/workers?refresh=1&json=1"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            data = json.loads(reply.read())
    except (OSError, urllib.error.URLError, ValueError):
        return {}
    return {w.get("hostname"): w for w in data.get("data", []) if isinstance(w, dict)}


@pytest.fixture(scope="module")
def stack(compose, redis_url, tmp_path_factory) -> Iterator[Stack]:
    """The worker and Flower, running as the compose file says; stopped after the module."""
    stack = Stack(compose, _stack_broker(redis_url), tmp_path_factory.mktemp("compose"))
    client = Celery("compose-test", broker=stack.broker, backend=stack.broker, set_as_current=False)
    try:
        worker = stack.command("worker").start()
        hostname = host_format(worker.argv[worker.argv.index("-n") + 1])
        wait_until(lambda: not worker.alive() or hostname in str(client.control.ping(timeout=0.5)),
                   60, 0.2, "the worker to answer ping")
        assert worker.alive(), worker.text()
        worker.track()
        stack.flower_port = _free_port()
        flower = stack.command("flower")
        flower.argv = [f"--port={stack.flower_port}" if a == "--port=5555" else a for a in flower.argv]
        flower.argv.append("--address=127.0.0.1")
        flower.start()
        wait_until(lambda: not flower.alive() or _flower_workers(stack.flower_port) != {} or None, 60, 0.5,
                   "Flower to answer")
        assert flower.alive(), flower.text()
        yield stack
    finally:
        client.close()
        leaked = stack.stop_all()
    assert not leaked, f"processes left behind: {leaked}"


def _worker(stack: Stack) -> Service:
    return next(s for s in stack.services if s.name == "worker")


@pytest.mark.integration
@pytest.mark.slow
def test_worker_serves_the_example_tasks(stack):
    import random

    client = Celery("compose-test", broker=stack.broker, backend=stack.broker, set_as_current=False)
    worker = _worker(stack)
    hostname = host_format(worker.argv[worker.argv.index("-n") + 1])
    try:
        calls = mixed_batch(random.Random(7), 40)
        calls += [TaskCall(TENANT, ("42", 2000), {"affinity": "tenant-42"}) for _ in range(6)]
        results = [send_call(client, call) for call in calls]
        for call, result in zip(calls, results, strict=True):
            value = result.get(timeout=90)
            assert result.successful(), (call, value)
        assert {c.kind for c in calls} == {"resize_image", "hash_password", "fetch_url", "tenant_report"}
        stats = client.control.inspect(destination=[hostname], timeout=5).stats()[hostname]
        pool = stats["pool"]
        assert pool["implementation"] == "celery_adaptive:Pool"
        assert pool["scheduler"]["keyed"] >= 6 + sum(1 for c in calls[:40] if c.kind == "tenant_report")
        cpuset = worker.cpus or os.sched_getaffinity(0)
        assert {c["cpu"] for c in pool["children"] if c["cpu"] is not None} <= cpuset
    finally:
        client.close()


@pytest.mark.integration
@pytest.mark.slow
def test_worker_healthcheck_passes(stack):
    """The worker's healthcheck command, run as Docker would run it inside the container."""
    spec = stack.compose["services"]["worker"]["healthcheck"]
    assert spec["test"][0] == "CMD" and spec["test"][1] == "celery"
    probe = stack.command("worker")  # the worker's environment, as in its container
    argv = [sys.executable, "-m", "celery", *spec["test"][2:]]
    done = subprocess.run(argv, cwd=ROOT, env=probe.env, capture_output=True, text=True, timeout=60)
    stack.services.remove(probe)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ready: consuming"), done.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_flower_answers_and_lists_the_worker(stack):
    worker = _worker(stack)
    hostname = host_format(worker.argv[worker.argv.index("-n") + 1])
    listed = wait_until(lambda: _flower_workers(stack.flower_port).get(hostname), 30, 0.5,
                        f"Flower to list {hostname}")
    assert listed["status"] is True
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.flower_port}/", timeout=5) as reply:
        assert reply.status == 200 and b"Flower" in reply.read()


@pytest.mark.integration
@pytest.mark.slow
def test_loadgen_round_completes(stack):
    loadgen = stack.command("loadgen", {"LOADGEN_ROUNDS": "1", "LOADGEN_BATCH": "30", "LOADGEN_PAUSE": "0",
                                        "LOADGEN_TIMEOUT": "90", "LOADGEN_SEED": "3"}).start()
    status = loadgen.wait(timeout=150)
    text = loadgen.text()
    assert status == 0, text
    assert re.search(r"round 1: sent 30 completed 30 failed 0 unfinished 0", text), text
    assert "stopped after 1 rounds: all tasks completed" in text


@pytest.mark.integration
@pytest.mark.slow
def test_beat_sends_the_periodic_burst(stack, tmp_path):
    worker = _worker(stack)
    beat = stack.command("beat", {"BURST_INTERVAL": "1", "BURST_SIZE": "3",
                                  "CELERY_BEAT_SCHEDULE_FILE": str(tmp_path / "celerybeat-schedule")}).start()
    try:
        wait_until(lambda: not beat.alive() or re.search(
            r"produce_burst\[[0-9a-f-]+\] succeeded in [\d.]+s: 3", worker.text()), 60, 0.5,
            "the worker to run a burst sent by beat")
        assert beat.alive(), beat.text()
    finally:
        assert not beat.stop(), "beat left processes behind"
