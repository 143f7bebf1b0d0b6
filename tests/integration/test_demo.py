"""`celery-adaptive demo`: the load plan, the 80-column view, and the command end to end.

The first tests call the demo's pure parts with prepared values (milliseconds). The others run
the command as a user would, from a directory outside the checkout, with no broker configured
(so it starts its own Redis), record every process under it while it runs, and fail if any of
them outlives it: after a full run, and after SIGINT or SIGTERM in the middle of one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import redis

from celery_adaptive.demo import (
    FULL_PLAN,
    SHORT_PLAN,
    Phase,
    Sample,
    TaskRecord,
    View,
    due_by,
    format_summary,
    percentile,
    plan_duration,
    rate_at,
    render_line,
    render_view,
    scaled_plan,
    summarize,
)

# ---------------------------------------------------------------------------- pure parts


def test_short_plan_is_short_and_has_a_burst_a_ramp_and_pauses():
    names = [p.name for p in SHORT_PLAN]
    assert {"burst", "ramp", "pause"} <= set(names)
    assert 20 <= plan_duration(SHORT_PLAN) <= 30
    assert plan_duration(FULL_PLAN) > plan_duration(SHORT_PLAN)


def test_due_by_integrates_the_rate():
    plan = (Phase("flat", 2.0, 10.0, 10.0), Phase("pause", 1.0, 0.0, 0.0), Phase("ramp", 4.0, 0.0, 8.0))
    assert due_by(plan, 0.0) == 0
    assert due_by(plan, 1.0) == 10
    assert due_by(plan, 2.5) == 20
    assert due_by(plan, 3.0 + 2.0) == 20 + 4  # half the ramp: 0 to 4/s over 2 s
    assert due_by(plan, 100.0) == 20 + 16
    counts = [due_by(SHORT_PLAN, t / 10) for t in range(0, 400)]
    assert counts == sorted(counts)
    assert rate_at(plan, 2.5) == 0.0 and rate_at(plan, 5.0) == 4.0 and rate_at(plan, 99) == 0.0


def test_plan_scales_with_the_pool():
    assert scaled_plan(SHORT_PLAN, 4) == SHORT_PLAN
    bigger = scaled_plan(SHORT_PLAN, 8)
    assert [p.duration for p in bigger] == [p.duration for p in SHORT_PLAN]
    assert due_by(bigger, plan_duration(bigger)) == pytest.approx(2 * due_by(SHORT_PLAN, 100), abs=1)


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(v) for v in range(101)], 95) == pytest.approx(95.0)


def _view(info: dict | None, **changes) -> View:
    values = dict(
        elapsed=12.3, planned=27.0, phase="ramp", phase_index=3, phases=5,
        broker="redis://127.0.0.1:45678/0 (embedded)", hostname="demo-1234abcd@" + "h" * 60,
        offered_rate=36.0, throughput=31.5, sent=123456, completed=123400, failed=0,
        latency_p50=0.25, latency_p95=3.5, latency_window=400, info=info,
        autoscaler={"min": 1, "max": 8, "qty": 3, "predictive": True,
                    "last-decision": "up 1->4: forecast 4.5/s x 504 ms with backlog 4 needs more than "
                                     "the maximum 4 children for wait <= 200 ms"},
        broker_queue=1234, stats_age=7.0,
        load_history=tuple(float(v % 40) for v in range(200)), pool_history=tuple(range(1, 9)) * 20,
    )
    values.update(changes)
    return View(**values)


FULL_INFO = {
    "target": 8, "queued": 12, "in-flight": 8, "min-children": 1, "max-children": 8,
    "children": [{"pid": 4_000_000 + n, "cpu": n % 2, "state": "busy", "tasks": 123456} for n in range(10)],
    "autoscaler": {"forecast": {"arrival-rate": 12.0, "predicted-rate": 18.35, "service-time": 0.5,
                                "backlog": 39},
                   "last-decision": {"direction": "up", "target": 4, "reason": "x" * 200}},
    "metrics": {"utilization": 0.31, "host_cpu_percent": 87.3, "wait_p95_s": 0.2, "run_p95_s": 0.5,
                "redis": {"redis": "ok"}},
}


@pytest.mark.parametrize("info", [None, {}, FULL_INFO, {"children": "garbage", "metrics": 3}])
@pytest.mark.parametrize("unicode", [True, False])
def test_view_fits_80_columns(info, unicode):
    lines = render_view(_view(info, unicode=unicode), width=80)
    assert lines and all(len(line) <= 80 for line in lines)
    assert all("\x1b" not in line for line in lines)  # escape codes belong to the screen, not the frame
    if not unicode:
        assert all(line.isascii() for line in lines)
    assert "\n" not in render_line(_view(info))


def test_view_shows_children_queue_forecast_and_latency():
    text = "\n".join(render_view(_view(FULL_INFO)))
    assert "children 10" in text and "in pool   12" in text and "broker  1234" in text
    assert "forecast  arrivals 12.0/s  predicted 18.4/s" in text
    assert "decision  xxx" in text and "p95  3.50s" in text
    assert str(4_000_000) in text and "... and 2 more" in text


def test_summary_counts_and_percentiles():
    records = [TaskRecord(f"id{n}", "resize_image", sent_at=n * 0.1, done_at=n * 0.1 + 0.5, state="SUCCESS")
               for n in range(10)]
    records.append(TaskRecord("bad", "fetch_url", 1.0, 1.2, "FAILURE", "fetch_url: ValueError('x')"))
    records.append(TaskRecord("lost", "fetch_url", 1.0))
    samples = [Sample(t=float(n), children=c, target=c, queued=0, in_flight=0, broker_queue=0, busy=0)
               for n, c in enumerate((1, 3, 4, 2))]
    summary = summarize(records, samples, duration=3.0, autoscale=(1, 4), interrupted=None,
                        broker="embedded", plot="out/demo.png")
    assert (summary.sent, summary.completed, summary.failed, summary.unfinished) == (12, 10, 1, 1)
    assert summary.latency["p50"] == pytest.approx(0.5)
    assert (summary.children_min, summary.children_max) == (1, 4)
    assert not summary.ok
    lines = format_summary(summary)
    assert all(len(line) <= 80 for line in lines)
    assert "tasks     sent 12  completed 10  failed 1  unfinished 1" in lines


# ---------------------------------------------------------------------------- end to end

ROOT = Path(__file__).resolve().parents[2]


def demo_argv(*args: str) -> list[str]:
    """The installed `celery-adaptive` script, else the same click group through Python."""
    script = Path(sys.executable).parent / "celery-adaptive"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "demo", *args]
    return [sys.executable, "-c", "from celery_adaptive.cli import main; main()", "demo", *args]


@dataclass
class TreeWatcher:
    """Records every process under ``root`` (pid: start time, parent, command line) until stopped."""

    root: int
    seen: dict[int, tuple[float, int, str]] = field(default_factory=dict)
    _halt: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> TreeWatcher:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                procs = psutil.Process(self.root).children(recursive=True)
            except psutil.Error:
                return
            for proc in procs:
                # Read again each time: just after fork, a child still shows its parent's cmdline.
                # But an exiting process (a zombie) shows an empty one: keep what was seen.
                try:
                    created, ppid, cmd = proc.create_time(), proc.ppid(), " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                known = self.seen.get(proc.pid)
                if not cmd and known is not None and known[0] == created:
                    continue
                self.seen[proc.pid] = (created, ppid, cmd)
            self._halt.wait(0.1)

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(5)

    def matching(self, predicate: Callable[[str], bool], parent: int | None = None) -> list[int]:
        return [pid for pid, (_, ppid, cmd) in self.seen.items()
                if predicate(cmd) and (parent is None or ppid == parent)]

    def children_of(self, pids: list[int]) -> list[int]:
        return [pid for pid, (_, ppid, _) in self.seen.items() if ppid in pids]

    def workers(self) -> list[int]:
        return self.matching(lambda cmd: "celery" in cmd and " worker " in cmd, parent=self.root)

    def survivors(self, grace: float = 5.0) -> list[str]:
        """Recorded processes still running (zombies waiting for init do not count)."""
        deadline = time.monotonic() + grace
        while True:
            alive = []
            for pid, (created, _, cmd) in self.seen.items():
                try:
                    proc = psutil.Process(pid)
                    if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{pid} {cmd}")
                except psutil.Error:
                    continue
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    def kill_survivors(self) -> None:
        for pid, (created, _, _) in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
            except psutil.Error:
                continue


@dataclass
class DemoRun:
    popen: subprocess.Popen[bytes]
    watcher: TreeWatcher
    output: Path
    out_dir: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.popen.poll() is not None:
                raise AssertionError(f"the demo exited ({self.popen.returncode}) before {what}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.text()}")
            time.sleep(0.1)

    def finish(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            raise AssertionError(f"the demo did not finish within {timeout}s:\n{self.text()}") from None
        finally:
            self.watcher.stop()


@pytest.fixture
def run_demo(tmp_path: Path):
    runs: list[DemoRun] = []

    def start(*args: str) -> DemoRun:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "ADAPTIVE_"))}
        env["PYTHONUNBUFFERED"] = "1"
        out_dir = tmp_path / "demo-output"
        output = tmp_path / "demo.txt"
        with open(output, "wb") as sink:
            popen = subprocess.Popen(demo_argv("--out", str(out_dir), *args), cwd=tmp_path, env=env,
                                     stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
        run = DemoRun(popen, TreeWatcher(popen.pid).start(), output, out_dir)
        runs.append(run)
        return run

    yield start
    for run in runs:  # a failed test must not leave its demo running either
        if run.popen.poll() is None:
            run.popen.send_signal(signal.SIGTERM)
            try:
                run.popen.wait(30)
            except subprocess.TimeoutExpired:
                run.popen.kill()
        run.watcher.stop()
        run.watcher.kill_survivors()


def _assert_started_and_cleaned(run: DemoRun, *, embedded: bool = True) -> None:
    redis_pids = run.watcher.matching(lambda cmd: "redis-server" in cmd)
    worker_pids = run.watcher.workers()
    assert len(worker_pids) == 1, f"expected one worker under the demo: {run.watcher.seen}"
    assert bool(redis_pids) == embedded, run.watcher.seen
    assert run.watcher.children_of(worker_pids), f"no pool children seen: {run.watcher.seen}"
    survivors = run.watcher.survivors()
    assert not survivors, f"left behind by the demo: {survivors}"


@pytest.mark.integration
@pytest.mark.slow
def test_demo_short_runs_end_to_end(run_demo):
    run = run_demo("--short")
    started = time.monotonic()
    status = run.finish(timeout=180)
    elapsed = time.monotonic() - started
    text = run.text()
    assert status == 0, text
    assert elapsed < 90, f"--short took {elapsed:.0f}s"

    summary = json.loads((run.out_dir / "summary.json").read_text())
    assert summary["sent"] > 100
    assert summary["completed"] == summary["sent"], text
    assert summary["failed"] == 0 and summary["unfinished"] == 0, text
    assert summary["interrupted"] is None and summary["broker"] == "embedded"
    assert summary["latency"]["p50"] is not None and summary["latency"]["p95"] >= summary["latency"]["p50"]
    assert set(summary["by_kind"]) == {"resize_image", "hash_password", "fetch_url", "tenant_report"}
    assert summary["children_max"] >= 2, "the pool never grew under the burst"
    assert summary["children_min"] >= 1

    sent = summary["sent"]
    assert re.search(rf"^tasks +sent {sent} +completed {sent} +failed 0 +unfinished 0$", text, re.M), text
    assert re.search(r"^latency +p50 +[\d.]+s +p90 +[\d.]+s +p95 +[\d.]+s", text, re.M), text
    assert re.search(r"^children +min \d+ +max \d+", text, re.M), text
    assert re.search(r"^t=\d+\.\ds burst sent=\d+ .*children=\d", text, re.M), "no periodic lines"
    summary_lines = text[text.index("-- summary"):].splitlines()
    assert all(len(line) <= 80 for line in summary_lines if not line.startswith("plot")), text

    png = run.out_dir / "demo.png"
    assert summary["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (run.out_dir / "timeline.csv").is_file() and (run.out_dir / "worker.log").is_file()
    _assert_started_and_cleaned(run)


def _mid_run(run: DemoRun) -> None:
    """Wait until the worker has children and the burst is being sent."""
    run.wait_for(lambda: re.search(r"^t=[\d.]+s burst ", run.text(), re.M) is not None, 90,
                 "the burst to start")
    run.wait_for(lambda: bool(run.watcher.children_of(run.watcher.workers())), 30, "the pool's children")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_run_stops_everything(run_demo, signum, status):
    run = run_demo("--short")
    _mid_run(run)
    run.popen.send_signal(signum)
    started = time.monotonic()
    assert run.finish(timeout=60) == status, run.text()
    assert time.monotonic() - started < 30
    assert f"stopped   by {signal.Signals(signum).name}" in run.text()
    summary = json.loads((run.out_dir / "summary.json").read_text())
    assert summary["interrupted"] == signal.Signals(signum).name and summary["plot"] is None
    _assert_started_and_cleaned(run)


@pytest.mark.integration
@pytest.mark.slow
def test_broker_option_uses_it_and_leaves_no_messages(run_demo, redis_url):
    """--broker: no Redis of our own; interrupted, the demo removes its queue from that broker."""
    run = run_demo("--short", "--broker", redis_url)
    _mid_run(run)
    queue = re.search(r"worker +demo-([0-9a-f]{8})@", run.text())
    assert queue, run.text()
    run.popen.send_signal(signal.SIGINT)
    assert run.finish(timeout=60) == 130, run.text()
    assert f"broker    {redis_url}" in run.text()
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.llen(f"celery-adaptive-demo-{queue.group(1)}") == 0
    finally:
        client.close()
    _assert_started_and_cleaned(run, embedded=False)
