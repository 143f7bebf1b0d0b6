"""``celery-adaptive demo``: the pool at work in one command.

Data flow::

    EmbeddedRedis (or --broker) <── send_task ── main loop: load plan → sends,
         │   ▲                                   results → latencies, view → terminal
         │   └──── results, pidbox replies ──┐
         ▼                                   │
    celery worker -P celery_adaptive:Pool ───┘ <── inspect stats ── sampler thread
      (own session; its children are the pool)                     (pool info → timeline)

The load plan, percentiles, the live view and the summary are plain functions of values, so
they are tested without a worker. Everything the demo starts (the Redis server, the worker and
its children) is stopped by pid or by the worker's own process group when it ends, is
interrupted (SIGINT, SIGTERM) or fails; every wait is bounded.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import click

EXIT_OK = 0
EXIT_TASKS_FAILED = 1
EXIT_ERROR = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class DemoError(RuntimeError):
    """The demo could not start or its worker died; the message says what to do."""


# ---------------------------------------------------------------------------- the load plan
@dataclass(frozen=True)
class Phase:
    """``duration`` seconds during which the offered load goes linearly from one rate to another."""

    name: str
    duration: float
    start_rate: float
    end_rate: float

    def sent_by(self, t: float) -> float:
        """Tasks offered from the start of the phase to ``t`` seconds into it."""
        t = min(max(t, 0.0), self.duration)
        slope = (self.end_rate - self.start_rate) / self.duration if self.duration else 0.0
        return self.start_rate * t + slope * t * t / 2


# Rates suit a pool of up to 4 children (two CPUs); `scaled_plan` adjusts them to the pool.
SHORT_PLAN: tuple[Phase, ...] = (
    Phase("warm-up", 2.0, 4.0, 4.0),
    Phase("burst", 4.0, 36.0, 36.0),
    Phase("pause", 7.0, 0.0, 0.0),
    Phase("ramp", 8.0, 4.0, 36.0),
    Phase("cool-down", 7.0, 0.0, 0.0),
)
FULL_PLAN: tuple[Phase, ...] = (
    Phase("warm-up", 10.0, 4.0, 4.0),
    Phase("burst", 8.0, 36.0, 36.0),
    Phase("pause", 25.0, 0.0, 0.0),
    Phase("ramp", 35.0, 4.0, 32.0),
    Phase("cool-down", 25.0, 0.0, 0.0),
)
PLAN_CHILDREN = 4


def scaled_plan(plan: Sequence[Phase], max_children: int) -> tuple[Phase, ...]:
    """The plan with its rates in proportion to the pool's maximum size, so a bigger machine
    sees the same story (a burst beyond capacity, a ramp that reaches it) instead of idling."""
    factor = max_children / PLAN_CHILDREN
    return tuple(Phase(p.name, p.duration, p.start_rate * factor, p.end_rate * factor) for p in plan)


def plan_duration(plan: Sequence[Phase]) -> float:
    return sum(p.duration for p in plan)


def phase_at(plan: Sequence[Phase], t: float) -> tuple[int, Phase] | None:
    """The phase running ``t`` seconds after the start (None once the plan is over)."""
    start = 0.0
    for index, phase in enumerate(plan):
        if t < start + phase.duration:
            return index, phase
        start += phase.duration
    return None


def rate_at(plan: Sequence[Phase], t: float) -> float:
    start = 0.0
    for phase in plan:
        if t < start + phase.duration:
            frac = (t - start) / phase.duration if phase.duration else 0.0
            return phase.start_rate + (phase.end_rate - phase.start_rate) * frac
        start += phase.duration
    return 0.0


def due_by(plan: Sequence[Phase], t: float) -> int:
    """How many tasks the plan has offered by ``t``: the integral of its rate, rounded down."""
    total, start = 0.0, 0.0
    for phase in plan:
        total += phase.sent_by(t - start)
        start += phase.duration
    return int(math.floor(total + 1e-9))


# ---------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * min(max(q, 0.0), 100.0) / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def per_second(times: Iterable[float], end: float) -> list[int]:
    """Counts in one-second bins from 0 to ``end`` (times are seconds since the start)."""
    bins = [0] * (int(math.ceil(max(end, 0.0))) + 1)
    for t in times:
        if 0 <= t <= end:
            bins[int(t)] += 1
    return bins


@dataclass
class TaskRecord:
    task_id: str
    kind: str
    sent_at: float  # seconds since the demo started
    done_at: float | None = None
    state: str | None = None
    error: str | None = None

    @property
    def latency(self) -> float | None:
        return None if self.done_at is None else max(0.0, self.done_at - self.sent_at)


@dataclass(frozen=True)
class Sample:
    """One look at the worker (from ``inspect stats``), ``t`` seconds after the start."""

    t: float
    children: int
    target: int
    queued: int
    in_flight: int
    broker_queue: int
    busy: int
    forecast: float | None = None  # the autoscaler's predicted arrival rate, when it has one


@dataclass(frozen=True)
class Summary:
    sent: int
    completed: int
    failed: int
    unfinished: int
    latency: dict[str, float | None]
    by_kind: dict[str, dict[str, Any]]
    children_min: int | None
    children_max: int | None
    autoscale: tuple[int, int]
    duration: float
    peak_offered: int
    peak_throughput: int
    interrupted: str | None
    broker: str
    plot: str | None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.interrupted is None and self.failed == 0 and self.unfinished == 0


def summarize(records: Sequence[TaskRecord], samples: Sequence[Sample], *, duration: float,
              autoscale: tuple[int, int], interrupted: str | None, broker: str,
              plot: str | None) -> Summary:
    done = [r for r in records if r.state is not None]
    ok = [r.latency for r in done if r.state == "SUCCESS" and r.latency is not None]
    failed = [r for r in done if r.state != "SUCCESS"]
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({r.kind for r in records}):
        mine = [r for r in records if r.kind == kind]
        lat = [r.latency for r in mine if r.latency is not None]
        by_kind[kind] = {
            "sent": len(mine),
            "completed": sum(1 for r in mine if r.state == "SUCCESS"),
            "p50": percentile(lat, 50),
            "p95": percentile(lat, 95),
        }
    children = [s.children for s in samples]
    return Summary(
        sent=len(records),
        completed=len(done) - len(failed),
        failed=len(failed),
        unfinished=len(records) - len(done),
        latency={f"p{q}": percentile(ok, q) for q in (50, 90, 95, 99)} | {"max": max(ok, default=None)},
        by_kind=by_kind,
        children_min=min(children, default=None),
        children_max=max(children, default=None),
        autoscale=autoscale,
        duration=duration,
        peak_offered=max(per_second((r.sent_at for r in records), duration), default=0),
        peak_throughput=max(per_second((r.done_at for r in done if r.done_at is not None), duration),
                            default=0),
        interrupted=interrupted,
        broker=broker,
        plot=plot,
        errors=sorted({r.error for r in failed if r.error})[:5],
    )


def _secs(value: float | None) -> str:
    return "   -  " if value is None else f"{value:5.2f}s"


def format_summary(summary: Summary) -> list[str]:
    lat = summary.latency
    lines = [
        "-- summary " + "-" * 47,
        f"tasks     sent {summary.sent}  completed {summary.completed}  failed {summary.failed}"
        f"  unfinished {summary.unfinished}",
        f"latency   p50 {_secs(lat['p50'])}  p90 {_secs(lat['p90'])}  p95 {_secs(lat['p95'])}"
        f"  p99 {_secs(lat['p99'])}  max {_secs(lat['max'])}",
    ]
    for kind, row in summary.by_kind.items():
        lines.append(f"  {kind:<15} {row['completed']:>5}/{row['sent']:<5} p50 {_secs(row['p50'])}"
                     f"  p95 {_secs(row['p95'])}")
    low, high = summary.autoscale
    lines += [
        f"children  min {summary.children_min if summary.children_min is not None else '-'}"
        f"  max {summary.children_max if summary.children_max is not None else '-'}"
        f"  (autoscale {low}..{high})",
        f"load      peak offered {summary.peak_offered}/s  peak completed {summary.peak_throughput}/s"
        f"  in {summary.duration:.1f}s",
    ]
    if summary.plot:
        lines.append(f"plot      {summary.plot}")
    for error in summary.errors:
        lines.append(f"error     {error[:68]}")
    if summary.interrupted:
        lines.append(f"stopped   by {summary.interrupted}; everything the demo started is stopped")
    return lines


# ---------------------------------------------------------------------------- the live view
@dataclass(frozen=True)
class View:
    """What one frame of the live view shows."""

    elapsed: float
    planned: float
    phase: str
    phase_index: int
    phases: int
    broker: str
    hostname: str
    offered_rate: float
    throughput: float
    sent: int
    completed: int
    failed: int
    latency_p50: float | None
    latency_p95: float | None
    latency_window: int
    info: dict[str, Any] | None
    autoscaler: dict[str, Any] | None
    broker_queue: int | None
    stats_age: float | None
    load_history: tuple[float, ...] = ()
    pool_history: tuple[int, ...] = ()
    unicode: bool = True


_BLOCKS = "▁▂▃▄▅▆▇█"
_ASCII = " .:-=+*#"


def sparkline(values: Sequence[float], width: int, top: float | None = None, unicode: bool = True) -> str:
    chars = _BLOCKS if unicode else _ASCII
    values = list(values)[-width:]
    if not values:
        return ""
    top = top if top else max(values) or 1.0
    return "".join(chars[min(len(chars) - 1, int(v / top * (len(chars) - 1) + 0.5))] for v in values)


def _section(mapping: Any, key: str) -> dict[str, Any]:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, dict) else {}


def _forecast_rate(pool: dict[str, Any]) -> float | None:
    return _scalar(_section(_section(pool, "autoscaler"), "forecast"), "predicted-rate")


def _scalar(mapping: Any, key: str) -> float | None:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _insight_lines(pool: dict[str, Any], scaler: dict[str, Any]) -> list[str]:
    """The autoscaler's forecast and last decision, and the metrics subsystem's figures, when
    the worker reports them (each part is optional: older pools have none of it)."""
    lines: list[str] = []
    auto = _section(pool, "autoscaler")
    forecast = _section(auto, "forecast")
    if forecast:
        parts = []
        for key, label, fmt in (("arrival-rate", "arrivals", "{:.1f}/s"),
                                ("predicted-rate", "predicted", "{:.1f}/s"),
                                ("service-time", "service", "{:.2f}s"),
                                ("backlog", "backlog", "{:.0f}")):
            value = _scalar(forecast, key)
            if value is not None:
                parts.append(f"{label} {fmt.format(value)}")
        if parts:
            lines.append("forecast  " + "  ".join(parts))
    decision = auto.get("last-decision") or scaler.get("last-decision")
    if isinstance(decision, dict):
        decision = decision.get("reason")
    if isinstance(decision, str) and decision:
        lines.append("decision  " + decision)
    metrics = _section(pool, "metrics")
    parts = []
    for key, label, scale, fmt in (("utilization", "utilization", 100.0, "{:.0f}%"),
                                   ("host_cpu_percent", "host cpu", 1.0, "{:.0f}%"),
                                   ("wait_p95_s", "wait p95", 1.0, "{:.2f}s"),
                                   ("run_p95_s", "run p95", 1.0, "{:.2f}s")):
        value = _scalar(metrics, key)
        if value is not None:
            parts.append(f"{label} {fmt.format(value * scale)}")
    if parts:
        lines.append("metrics   " + "  ".join(parts))
    return lines


def render_view(view: View, width: int = 80) -> list[str]:
    """One frame of the live view: lines no wider than ``width``."""
    phase = f"phase {view.phase_index + 1}/{view.phases}: {view.phase}" if view.phase_index >= 0 else view.phase
    lines = [
        f"celery-adaptive demo   t={view.elapsed:6.1f}s / {view.planned:.0f}s   {phase}",
        f"broker {view.broker}   worker {view.hostname}",
        f"load      offered {view.offered_rate:5.1f}/s  completed {view.throughput:5.1f}/s"
        f"  sent {view.sent}  done {view.completed}  failed {view.failed}",
        f"latency   p50 {_secs(view.latency_p50)}  p95 {_secs(view.latency_p95)}"
        f"  (last 10 s, {view.latency_window} tasks)",
    ]
    info = view.info or {}
    if info:
        children = [c for c in info.get("children", []) if isinstance(c, dict)]
        broker_q = "-" if view.broker_queue is None else str(view.broker_queue)
        lines.append(f"queue     broker {broker_q:>5}  in pool {info.get('queued', 0):>4}"
                     f"  in flight {info.get('in-flight', 0):>3}")
        scaler = view.autoscaler or {}
        lines.append(
            f"pool      children {len(children)}  target {info.get('target', '-')}"
            f"  range {scaler.get('min', info.get('min-children', '-'))}.."
            f"{scaler.get('max', info.get('max-children', '-'))}"
            + ("  predictive" if scaler.get("predictive") else "")
        )
        lines.extend(_insight_lines(info, scaler))
    else:
        lines.append("queue     waiting for the worker's first stats reply ...")
        children = []
    spark_width = max(10, width - 12)
    if view.load_history:
        lines.append(f"load/s    {sparkline(view.load_history, spark_width, unicode=view.unicode)}")
    if view.pool_history:
        top = float(max(view.pool_history) or 1)
        lines.append(f"children  {sparkline([float(v) for v in view.pool_history], spark_width, top, view.unicode)}")
    if children:
        lines.append("  pid       cpu  state       tasks")
        shown = children[:8]
        for child in shown:
            cpu = "-" if child.get("cpu") is None else child.get("cpu")
            lines.append(f"  {child.get('pid', '-')!s:<9} {cpu!s:>3}  {child.get('state', '?')!s:<10}"
                         f" {child.get('tasks', 0)!s:>6}")
        if len(children) > len(shown):
            lines.append(f"  ... and {len(children) - len(shown)} more")
    if view.stats_age is not None and view.stats_age > 5:
        lines.append(f"(the worker's stats are {view.stats_age:.0f}s old)")
    return [line[:width] for line in lines]


def render_line(view: View) -> str:
    """The view as one log line (about 80 columns), for output that is not a terminal."""
    info = view.info or {}
    p50 = "-" if view.latency_p50 is None else f"{view.latency_p50:.2f}s"
    p95 = "-" if view.latency_p95 is None else f"{view.latency_p95:.2f}s"
    broker_q = "-" if view.broker_queue is None else str(view.broker_queue)
    children = info.get("children")
    return (
        f"t={view.elapsed:.1f}s {view.phase} sent={view.sent} done={view.completed}"
        f" failed={view.failed} children={len(children) if isinstance(children, list) else '-'}"
        f" queued={broker_q}+{info.get('queued', '-')} run={info.get('in-flight', '-')}"
        f" p50={p50} p95={p95}"
    )


class Screen:
    """Redraws a block of lines in place with plain ANSI codes, or prints periodic lines."""

    def __init__(self, stream: TextIO, interval_lines: float) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval_lines = interval_lines
        self._drawn = 0
        self._last_line = -math.inf
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            _BLOCKS.encode(encoding)
            self.unicode = True
        except (UnicodeEncodeError, LookupError):
            self.unicode = False

    @property
    def width(self) -> int:
        if not self.tty:
            return 80
        return max(40, min(80, shutil.get_terminal_size((80, 24)).columns - 1))

    def show(self, view: View, now: float) -> None:
        if self.tty:
            lines = render_view(view, self.width)
            out = [f"\x1b[{self._drawn}F" if self._drawn else "\x1b[?25l"]
            out += [line + "\x1b[K\n" for line in lines]
            out.append("\x1b[J")
            self.stream.write("".join(out))
            self._drawn = len(lines)
        elif now - self._last_line >= self.interval_lines:
            self._last_line = now
            self.stream.write(render_line(view) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\x1b[?25h")
            self.stream.flush()
        self._drawn = 0


# ---------------------------------------------------------------------------- processes
def example_project_root() -> Path:
    """The directory that holds the ``example_project`` package.

    Next to this package in a checkout (or in site-packages when it was installed with it),
    else wherever Python can import it from."""
    beside = Path(__file__).resolve().parent.parent
    if (beside / "example_project" / "__init__.py").is_file():
        return beside
    spec = importlib.util.find_spec("example_project")
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent.parent
    raise DemoError(
        "the example_project package was not found: run the demo from a checkout of "
        "celery-adaptive, or put the directory that contains example_project on PYTHONPATH"
    )


class Stopper:
    """SIGINT/SIGTERM set a flag the loops check; a second signal asks cleanup to hurry."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.hurry = threading.Event()
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set():
            self.hurry.set()
            return
        self.signal_name = signal.Signals(signum).name
        self.stop.set()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; the caller stops us through .stop
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class WorkerProcess:
    """The ``celery worker`` the demo starts, in its own session (so its process group is ours
    to signal and the terminal's Ctrl-C reaches only the demo, which then stops it)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, logfile: Path) -> None:
        self.argv, self.env, self.cwd, self.logfile = argv, env, cwd, logfile
        self.popen: subprocess.Popen[bytes] | None = None
        self._known: dict[int, float] = {}  # pid -> create_time of every descendant seen

    def start(self) -> None:
        with open(self.logfile, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def track(self) -> None:
        """Remember the worker's descendants, to stop any that outlive it."""
        import psutil

        if not self.alive() or self.pid is None:
            return
        try:
            for proc in psutil.Process(self.pid).children(recursive=True):
                try:
                    self._known.setdefault(proc.pid, proc.create_time())
                except psutil.Error:
                    continue
        except psutil.Error:
            return

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait(self, seconds: float, hurry: threading.Event) -> bool:
        assert self.popen is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                return True
            if hurry.is_set():
                return False
            time.sleep(0.05)
        return self.popen.poll() is not None

    def stop(self, hurry: threading.Event, warm_timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM), then cold (SIGQUIT), then SIGKILL to the process group and
        to every descendant seen; returns when none of them is left."""
        import psutil

        if self.popen is None:
            return
        pgid = self.popen.pid  # start_new_session: the worker leads its own group
        if self.alive():
            self.track()
            self.popen.send_signal(signal.SIGTERM)
            if not self._wait(warm_timeout, hurry):
                self.popen.send_signal(signal.SIGQUIT)
                if not self._wait(3.0, hurry):
                    self.popen.kill()
                    self.popen.wait(timeout=5)
        try:
            os.killpg(pgid, signal.SIGKILL)  # anything of the worker's still in its group
        except (ProcessLookupError, PermissionError):
            pass
        left = []
        for pid, created in self._known.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
                    left.append(proc)
            except psutil.Error:
                continue
        psutil.wait_procs(left, timeout=5)


# ---------------------------------------------------------------------------- sampling
class StatsSampler(threading.Thread):
    """Asks the worker for ``inspect stats`` once a ``interval``; keeps the latest reply and a
    timeline of pool size. Its own Celery app: connections are not shared across threads."""

    def __init__(self, broker: str, hostname: str, queue: str, started: float, interval: float) -> None:
        super().__init__(name="demo-stats", daemon=True)
        self.broker, self.hostname, self.queue = broker, hostname, queue
        self.started, self.interval = started, interval
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.samples: list[Sample] = []
        self.latest: dict[str, Any] | None = None
        self.latest_at: float | None = None
        self.broker_queue: int | None = None

    def run(self) -> None:
        import redis
        from celery import Celery

        app = Celery("celery-adaptive-demo-stats", broker=self.broker, set_as_current=False)
        client = redis.Redis.from_url(self.broker, socket_timeout=2, socket_connect_timeout=2)
        try:
            while not self.halt.is_set():
                self._sample(app, client)
                self.halt.wait(self.interval)
        finally:
            client.close()
            app.close()

    def _sample(self, app: Any, client: Any) -> None:
        try:
            depth: int | None = int(client.llen(self.queue))
        except Exception:
            depth = None
        try:
            replies = app.control.inspect(destination=[self.hostname], timeout=1.0, limit=1).stats()
        except Exception:
            replies = None
        stats = (replies or {}).get(self.hostname)
        now = time.monotonic() - self.started
        with self.lock:
            self.broker_queue = depth
            if not stats:
                return
            self.latest, self.latest_at = stats, now
            pool = stats.get("pool", {})
            children = [c for c in pool.get("children", []) if isinstance(c, dict)]
            self.samples.append(Sample(
                t=now,
                children=len(children),
                target=int(pool.get("target", len(children)) or 0),
                queued=int(pool.get("queued", 0) or 0),
                in_flight=int(pool.get("in-flight", 0) or 0),
                broker_queue=depth or 0,
                busy=sum(1 for c in children if c.get("state") == "busy"),
                forecast=_forecast_rate(pool),
            ))

    def snapshot(self) -> tuple[dict[str, Any] | None, float | None, int | None, list[Sample]]:
        with self.lock:
            return self.latest, self.latest_at, self.broker_queue, list(self.samples)


class ResultCollector:
    """Reads finished tasks' results straight from the result backend in batches (one MGET
    for many tasks), and turns their ``date_done`` into a latency."""

    BATCH = 500

    def __init__(self, app: Any, started_wall: float, started: float) -> None:
        self.backend = app.backend
        self.started_wall, self.started = started_wall, started
        self.records: list[TaskRecord] = []
        self._pending: dict[str, TaskRecord] = {}

    def add(self, record: TaskRecord) -> None:
        self.records.append(record)
        self._pending[record.task_id] = record

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def poll(self) -> None:
        from celery import states

        ids = list(self._pending)
        for offset in range(0, len(ids), self.BATCH):
            chunk = ids[offset:offset + self.BATCH]
            values = self.backend.mget([self.backend.get_key_for_task(i) for i in chunk])
            observed = time.monotonic() - self.started
            for task_id, raw in zip(chunk, values, strict=True):
                if raw is None:
                    continue
                meta = self.backend.decode_result(raw)
                if meta.get("status") not in states.READY_STATES:
                    continue
                record = self._pending.pop(task_id)
                record.state = str(meta["status"])
                record.done_at = self._done_at(meta.get("date_done"), observed)
                if record.state != states.SUCCESS:
                    record.error = f"{record.kind}: {meta.get('result')!r}"

    def _done_at(self, date_done: Any, observed: float) -> float:
        when: datetime | None = None
        if isinstance(date_done, datetime):
            when = date_done
        elif isinstance(date_done, str):
            try:
                when = datetime.fromisoformat(date_done.replace("Z", "+00:00"))
            except ValueError:
                when = None
        if when is None:
            return observed
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return min(observed, when.timestamp() - self.started_wall)


# ---------------------------------------------------------------------------- the plot
def write_timeline(path: Path, samples: Sequence[Sample], records: Sequence[TaskRecord],
                   duration: float) -> None:
    offered = per_second((r.sent_at for r in records), duration)
    completed = per_second((r.done_at for r in records if r.done_at is not None), duration)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["second", "offered", "completed"])
        for second, (sent, done) in enumerate(zip(offered, completed, strict=True)):
            writer.writerow([second, sent, done])
    with open(path.with_name("samples.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(Sample.__dataclass_fields__))
        for sample in samples:
            writer.writerow(list(asdict(sample).values()))


def write_plot(path: Path, samples: Sequence[Sample], records: Sequence[TaskRecord],
               plan: Sequence[Phase], duration: float, autoscale: tuple[int, int]) -> bool:
    """Pool size against load, as a PNG. False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    offered = per_second((r.sent_at for r in records), duration)
    completed = per_second((r.done_at for r in records if r.done_at is not None), duration)
    seconds = list(range(len(offered)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    start = 0.0
    for index, phase in enumerate(plan):
        for axis in (top, bottom):
            if index % 2:
                axis.axvspan(start, start + phase.duration, color="0.93", zorder=0)
        top.text(start + phase.duration / 2, 1.01, phase.name, transform=top.get_xaxis_transform(),
                 ha="center", va="bottom", fontsize=8, color="0.35")
        start += phase.duration
    top.step(seconds, offered, where="post", label="offered (tasks/s)", color="tab:blue")
    top.step(seconds, completed, where="post", label="completed (tasks/s)", color="tab:green")
    forecast = [(s.t, s.forecast) for s in samples if s.forecast is not None]
    if forecast:
        top.plot([t for t, _ in forecast], [f for _, f in forecast], color="tab:blue", alpha=0.5,
                 linestyle="--", label="forecast (tasks/s)")
    if samples:
        queue = top.twinx()
        queue.fill_between([s.t for s in samples], [s.broker_queue + s.queued for s in samples],
                           step="post", color="tab:orange", alpha=0.25, label="waiting (tasks)")
        queue.set_ylabel("waiting tasks")
        queue.set_ylim(bottom=0)
        queue.legend(loc="upper right", fontsize=8)
        times = [s.t for s in samples]
        bottom.step(times, [s.children for s in samples], where="post", color="tab:purple",
                    label="children")
        bottom.step(times, [s.busy for s in samples], where="post", color="tab:red", alpha=0.6,
                    linestyle=":", label="busy children")
        bottom.step(times, [s.target for s in samples], where="post", color="0.4", linestyle="--",
                    label="target")
    bottom.axhline(autoscale[1], color="0.7", linewidth=0.8)
    bottom.axhline(autoscale[0], color="0.7", linewidth=0.8)
    bottom.set_ylim(0, autoscale[1] + 1)
    top.set_ylabel("tasks / s")
    top.set_ylim(bottom=0)
    top.legend(loc="upper left", fontsize=8)
    bottom.set_ylabel("pool size")
    bottom.set_xlabel("seconds since start")
    bottom.legend(loc="upper left", fontsize=8)
    fig.suptitle("celery-adaptive demo: pool size against load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- the demo
@dataclass(frozen=True)
class DemoOptions:
    broker: str | None
    short: bool
    out: Path
    min_children: int
    max_children: int
    seed: int = 1


class Demo:
    def __init__(self, options: DemoOptions, stream: TextIO | None = None) -> None:
        self.options = options
        self.plan = scaled_plan(SHORT_PLAN if options.short else FULL_PLAN, options.max_children)
        self.stream = stream or sys.stdout
        self.stopper = Stopper()
        self.token = uuid.uuid4().hex[:8]
        self.queue = f"celery-adaptive-demo-{self.token}"
        self.hostname = f"demo-{self.token}@{socket.gethostname()}"
        self.redis: Any = None
        self.worker: WorkerProcess | None = None
        self.sampler: StatsSampler | None = None

    # -- what the user sees
    def say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def run(self) -> int:
        """Run the demo; the exit status is 0 when every task completed."""
        self.stopper.install()
        try:
            return self._run()
        except DemoError as exc:
            self.say(f"demo: {exc}")
            return EXIT_ERROR
        finally:
            self._cleanup()
            self.stopper.restore()

    def _run(self) -> int:
        import random

        from celery import Celery

        opts = self.options
        opts.out.mkdir(parents=True, exist_ok=True)
        broker = self._broker()
        if self.stopper.stop.is_set():
            return self._interrupted_exit()
        root = example_project_root()
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from example_project.load import make_call, send_call

        self.worker = self._start_worker(broker, root)
        if not self._wait_worker_ready(broker):
            return self._interrupted_exit()

        app = Celery("celery-adaptive-demo", broker=broker, backend=broker, set_as_current=False)
        app.conf.update(broker_connection_retry_on_startup=True, task_serializer="json",
                        result_serializer="json", accept_content=["json"])
        started_wall, started = time.time(), time.monotonic()
        collector = ResultCollector(app, started_wall, started)
        self.sampler = StatsSampler(broker, self.hostname, self.queue, started, interval=1.0)
        self.sampler.start()
        screen = Screen(self.stream, interval_lines=2.0 if opts.short else 5.0)
        rng = random.Random(opts.seed)
        planned = plan_duration(self.plan)
        drain_limit = planned + (45.0 if opts.short else 120.0)
        next_poll = 0.0
        interrupted: str | None = None
        try:
            while True:
                now = time.monotonic() - started
                if self.stopper.stop.is_set():
                    interrupted = self.stopper.signal_name or "request"
                    break
                if not self.worker.alive():
                    raise DemoError(f"the worker exited (status {self.worker.popen.returncode if self.worker.popen else '?'});"
                                    f" last lines of {self.worker.logfile}:\n{self.worker.log_tail()}")
                due = due_by(self.plan, now) if now < planned else len(collector.records)
                while len(collector.records) < due:
                    call = make_call(rng)
                    result = send_call(app, call, queue=self.queue)
                    collector.add(TaskRecord(result.id, call.kind, time.monotonic() - started))
                if now >= next_poll:
                    next_poll = now + 0.25
                    collector.poll()
                    self.worker.track()
                    screen.show(self._view(collector, now, planned, screen.unicode), now)
                if now >= planned and collector.outstanding == 0:
                    break
                if now >= drain_limit:
                    break
                self.stopper.stop.wait(0.02)
            collector.poll()
            duration = time.monotonic() - started
            screen.show(self._view(collector, duration, planned, screen.unicode), math.inf)
        finally:
            screen.close()
            self.sampler.halt.set()
            self.sampler.join(timeout=5)
            app.close()
        samples = self.sampler.snapshot()[3]
        records = collector.records
        plot: str | None = None
        write_timeline(opts.out / "timeline.csv", samples, records, duration)
        if interrupted is None:
            png = opts.out / "demo.png"
            if write_plot(png, samples, records, self.plan, duration,
                          (opts.min_children, opts.max_children)):
                plot = str(png)
            else:
                self.say("(no plot: matplotlib is not installed; pip install 'celery-adaptive[demo]')")
        summary = summarize(records, samples, duration=duration,
                            autoscale=(opts.min_children, opts.max_children),
                            interrupted=interrupted,
                            broker="embedded" if self.redis is not None else broker, plot=plot)
        (opts.out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        self.say("")
        for line in format_summary(summary):
            self.say(line)
        if interrupted is not None:
            return EXIT_SIGTERM if interrupted == "SIGTERM" else EXIT_SIGINT
        return EXIT_OK if summary.ok else EXIT_TASKS_FAILED

    def _interrupted_exit(self) -> int:
        name = self.stopper.signal_name or "request"
        self.say(f"demo: stopped by {name} while starting")
        return EXIT_SIGTERM if name == "SIGTERM" else EXIT_SIGINT

    def _broker(self) -> str:
        from celery_adaptive.embedded_redis import EmbeddedRedis, RedisUnavailable, redis_answers

        if self.options.broker:
            url = self.options.broker
            if not url.startswith(("redis://", "rediss://", "unix://")):
                raise DemoError(f"--broker {url}: the demo needs a Redis broker (it keeps results there too)")
            if not redis_answers(url, timeout=2.0):
                raise DemoError(f"--broker {url}: no Redis answers there")
            self.say(f"broker    {url}")
            return url
        self.redis = EmbeddedRedis()  # assigned before start, so cleanup stops a half-started one
        try:
            self.redis.start()
        except RedisUnavailable as exc:
            raise DemoError(f"{exc}; or pass --broker redis://HOST:PORT/DB") from None
        self.say(f"broker    embedded redis-server on {self.redis.url} (pid {self.redis.process.pid})")
        return str(self.redis.url)

    def _start_worker(self, broker: str, root: Path) -> WorkerProcess:
        opts = self.options
        argv = [
            sys.executable, "-m", "celery", "-A", "example_project", "worker",
            "-P", "celery_adaptive:Pool", "-c", str(opts.max_children),
            f"--autoscale={opts.max_children},{opts.min_children}",
            "-l", "warning", "-n", self.hostname, "-Q", self.queue,
            "--without-gossip", "--without-mingle",
        ]
        env = dict(os.environ)
        env.update({
            "CELERY_BROKER_URL": broker,
            "CELERY_RESULT_BACKEND": broker,
            "PYTHONPATH": os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p),
            "PYTHONUNBUFFERED": "1",
            # The pool shrinks after demand stayed lower this long (30 s in production): short
            # enough here that the pauses show it.
            "ADAPTIVE_STABILIZATION_WINDOW": "3" if opts.short else "10",
        })
        worker = WorkerProcess(argv, env, opts.out, opts.out / "worker.log")
        worker.start()
        self.say(f"worker    {self.hostname} (pid {worker.pid}), log {worker.logfile}")
        return worker

    def _wait_worker_ready(self, broker: str, timeout: float = 60.0) -> bool:
        from celery import Celery

        assert self.worker is not None
        app = Celery("celery-adaptive-demo-ping", broker=broker, set_as_current=False)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.stopper.stop.is_set():
                    return False
                if not self.worker.alive():
                    raise DemoError(f"the worker exited at start; last lines of {self.worker.logfile}:\n"
                                    f"{self.worker.log_tail()}")
                try:
                    replies = app.control.ping(destination=[self.hostname], timeout=0.5)
                except Exception:
                    replies = []
                if any(self.hostname in reply for reply in replies or []):
                    self.worker.track()
                    return True
        finally:
            app.close()
        raise DemoError(f"the worker did not answer within {timeout:.0f}s; see {self.worker.logfile}")

    def _view(self, collector: ResultCollector, now: float, planned: float, unicode: bool) -> View:
        assert self.sampler is not None
        latest, latest_at, depth, samples = self.sampler.snapshot()
        records = collector.records
        recent = [r.latency for r in records
                  if r.done_at is not None and r.latency is not None and r.done_at >= now - 10]
        completed = sum(1 for r in records if r.state == "SUCCESS")
        failed = sum(1 for r in records if r.state is not None and r.state != "SUCCESS")
        throughput = sum(1 for r in records if r.done_at is not None and r.done_at >= now - 5) / 5
        located = phase_at(self.plan, now)
        phase_index, phase = (located[0], located[1].name) if located else (-1, "draining")
        offered = per_second((r.sent_at for r in records), now)
        return View(
            elapsed=min(now, 1e9), planned=planned, phase=phase, phase_index=phase_index,
            phases=len(self.plan), broker=(self.redis.url + " (embedded)") if self.redis else (self.options.broker or ""),
            hostname=self.hostname, offered_rate=rate_at(self.plan, now), throughput=throughput,
            sent=len(records), completed=completed, failed=failed,
            latency_p50=percentile(recent, 50), latency_p95=percentile(recent, 95),
            latency_window=len(recent), info=(latest or {}).get("pool"),
            autoscaler=(latest or {}).get("autoscaler"), broker_queue=depth,
            stats_age=None if latest_at is None else max(0.0, now - latest_at),
            load_history=tuple(float(v) for v in offered[:-1]),
            pool_history=tuple(s.children for s in samples),
            unicode=unicode,
        )

    def _cleanup(self) -> None:
        """Stop what we started, newest first: sampler, worker (and its children), Redis."""
        if self.sampler is not None and self.sampler.is_alive():
            self.sampler.halt.set()
            self.sampler.join(timeout=5)
        if self.worker is not None:
            self.worker.stop(self.stopper.hurry, warm_timeout=10.0 if self.options.short else 20.0)
            if self.options.broker:
                self._purge_queue(self.options.broker)
        if self.redis is not None:
            self.redis.stop()

    def _purge_queue(self, broker: str) -> None:
        """On a broker we do not own, leave no demo messages behind."""
        import redis

        try:
            client = redis.Redis.from_url(broker, socket_timeout=2, socket_connect_timeout=2)
            try:
                client.delete(self.queue)
            finally:
                client.close()
        except Exception:
            pass


def default_children() -> tuple[int, int]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1, max(2, min(8, 2 * cpus))


@click.command(name="demo", help=(
    "Run the pool on a demo load and watch it: an embedded Redis (unless --broker), a worker, "
    "a burst, a ramp and pauses; a live view, then a summary and a plot in --out."
))
@click.option("--broker", envvar="CELERY_BROKER_URL", default=None, metavar="URL",
              help="Use this Redis instead of starting one (default: $CELERY_BROKER_URL).")
@click.option("--short", is_flag=True, help="A short run (about 25 s) instead of about 2 minutes.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"),
              show_default=True, help="Directory for the plot, the summary and the worker log.")
@click.option("--min-children", type=click.IntRange(1), default=None, help="Autoscale minimum (default 1).")
@click.option("--max-children", type=click.IntRange(1), default=None,
              help="Autoscale maximum (default: twice the CPUs, 2..8).")
def demo_command(broker: str | None, short: bool, out: Path, min_children: int | None,
                 max_children: int | None) -> None:
    low, high = default_children()
    low = min_children or low
    high = max_children or max(high, low)
    if low > high:
        raise click.BadParameter(f"--min-children {low} is above --max-children {high}")
    demo = Demo(DemoOptions(broker=broker or None, short=short, out=out, min_children=low, max_children=high))
    sys.exit(demo.run())


if __name__ == "__main__":
    demo_command(prog_name="celery-adaptive demo")
