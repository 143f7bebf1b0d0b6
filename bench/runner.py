"""Run every (repetition, workload, pool) against a fresh worker on one private Redis.

Order: repetition, then workload, then pool, with the pool order rotated by one each repetition
so no pool always runs first (warm caches) or last (a hot machine). Each run: flush Redis, start
a worker and wait for its ping, sample its process tree, replay the workload's schedule, wait for
every result (bounded), stop the worker, write ``runs/<id>.json``. A run that fails (worker did
not start, tasks lost or errored) is written too, with ``status: failed`` and the reason.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celery
import redis

from bench import metrics
from bench.cgroup import MemoryBudget
from bench.loadgen import Say, collect, make_client, send_schedule
from bench.pools import PoolConfig
from bench.sampler import TreeSampler, host_busy_seconds, process_cpu_seconds
from bench.worker import Worker, WorkerStartError, worker_command
from bench.workloads import Sizing, Workload, build, fingerprint

BROKER_DB, BACKEND_DB = 0, 1
CLI_REJECTED = "Invalid value for '-P'"


@dataclass(frozen=True)
class Plan:
    workloads: tuple[str, ...]
    pools: tuple[PoolConfig, ...]
    repeat: int
    concurrency: int
    cpus: int
    quick: bool
    seed: int
    baseline: str
    out_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    #: Bytes: each worker runs in a fresh memory cgroup with this limit (bench/cgroup.py).
    memory_budget: int | None = None


def run_order(plan: Plan) -> list[tuple[int, str, PoolConfig]]:
    order: list[tuple[int, str, PoolConfig]] = []
    for rep in range(plan.repeat):
        shift = rep % len(plan.pools)
        pools = plan.pools[shift:] + plan.pools[:shift]
        for workload in plan.workloads:
            order.extend((rep, workload, pool) for pool in pools)
    return order


def drain_timeout(workload: Workload) -> float:
    """Generous enough for one process doing all the work serially, plus per-task overhead."""
    return 30.0 + 2.0 * workload.total_service_s + 0.01 * len(workload.arrivals)


def jsonable(value: Any) -> Any:
    """NaN is not JSON; write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def host_info(plan: Plan) -> dict[str, Any]:
    return {"cpus": plan.cpus, "python": platform.python_version(), "celery": celery.__version__,
            "platform": platform.platform()}


class Runner:
    def __init__(self, plan: Plan, broker_url: str, backend_url: str, say: Say,
                 redis_pid: int | None = None) -> None:
        self.plan = plan
        self.redis_pid = redis_pid
        self.broker_url = broker_url
        self.backend_url = backend_url
        self.say = say
        # A module:Class pool the CLI rejected is remembered in its -P custom form.
        self.effective: dict[str, PoolConfig] = {p.name: p for p in plan.pools}

    def run_all(self) -> list[dict[str, Any]]:
        order = run_order(self.plan)
        sizing = Sizing(self.plan.cpus, self.plan.quick, self.plan.seed, dict(self.plan.overrides))
        workloads = {name: build(name, sizing)
                     for name in self.plan.workloads}
        records = []
        for index, (rep, name, pool) in enumerate(order, start=1):
            workload = workloads[name]
            self.say(f"[{index}/{len(order)}] rep {rep + 1} {name} x {pool.name}: "
                     f"{len(workload.arrivals)} tasks over {workload.duration_s:.1f}s")
            record = self.run_one(rep, workload, self.effective[pool.name])
            records.append(record)
            self.say("    " + one_line(record))
        return records

    def _flush(self) -> None:
        client = redis.Redis.from_url(self.broker_url)
        try:
            client.flushall()
        finally:
            client.close()

    def _start_worker(self, pool: PoolConfig, log_path: Path,
                      budget: MemoryBudget | None = None) -> Worker:
        """A ready worker; retries a rejected ``-P module:Class`` once as ``-P custom``."""
        for attempt in range(2):
            client = make_client(self.broker_url)
            worker = Worker(pool, self.broker_url, self.backend_url, log_path, budget=budget)
            try:
                worker.start(client)
                return worker
            except WorkerStartError as exc:
                worker.stop()
                fallback = pool.with_custom_fallback()
                if attempt or fallback is None or CLI_REJECTED not in exc.log_tail:
                    raise
                self.say(f"    -P {pool.pool_class} rejected by the CLI; retrying with -P custom")
                pool = self.effective[pool.name] = fallback
            except BaseException:
                worker.stop()
                raise
            finally:
                client.close()
        raise AssertionError("unreachable")

    def run_one(self, rep: int, workload: Workload, pool: PoolConfig) -> dict[str, Any]:
        run_id = f"r{rep + 1}-{workload.name}-{pool.slug}"
        record: dict[str, Any] = {
            "schema": 1, "run_id": run_id, "repetition": rep + 1, "pool": pool.name,
            "workload": workload.name, "workload_spec": workload.describe(),
            "schedule_fingerprint": fingerprint(workload), "concurrency": self.plan.concurrency,
            "quick": self.plan.quick, "host": host_info(self.plan),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "failed",
            "failure": None,
        }
        started = time.monotonic()
        budget: MemoryBudget | None = None
        try:
            self._flush()
            if self.plan.memory_budget is not None:
                budget = MemoryBudget(self.plan.memory_budget)
            worker = self._start_worker(pool, self.plan.out_dir / "logs" / f"{run_id}.log", budget)
            try:
                record["command"] = worker_command(worker.pool, worker.hostname)
                record["env"] = worker.pool.env
                record.update(self._measure(worker, workload))
            finally:
                worker.stop()  # idempotent; _measure has normally stopped it already
                if budget is not None:
                    record["memory_budget"] = vars(budget.figures())
            problems = [f"{record['figures'][k]} {k}" for k in ("lost", "errors")
                        if record["figures"][k]]
            if record["exit_code"] not in (0, None):
                problems.append(f"worker exit code {record['exit_code']}")
            record["status"] = "failed" if problems else "ok"
            record["failure"] = ", ".join(problems) or None
        except Exception as exc:  # one broken pool must not end the whole session
            record["failure"] = f"{type(exc).__name__}: {exc}".strip()
            record["traceback"] = traceback.format_exc()
            if isinstance(exc, WorkerStartError):
                record["log_tail"] = exc.log_tail
                last = [line for line in exc.log_tail.splitlines() if line.strip()][-3:]
                self.say("\n".join("    | " + line for line in last))
        finally:
            if budget is not None:
                try:
                    budget.close()
                except OSError as exc:
                    self.say(f"    warning: could not remove the cgroup {budget.path}: {exc}")
        record["wall_s"] = round(time.monotonic() - started, 2)
        path = self.plan.out_dir / "runs" / f"{run_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(jsonable(record), indent=1))
        return record

    def _measure(self, worker: Worker, workload: Workload) -> dict[str, Any]:
        """Sample, send, drain, stop: the worker is stopped before the figures are computed."""
        try:
            sampler = TreeSampler(worker.pid)
            sampler.start()
            client = make_client(self.broker_url)
            try:
                host_before, ours_before = host_busy_seconds(), self._harness_cpu()
                start = time.time()
                sent = send_schedule(client, workload, self.say)
                results = collect(self.backend_url, sent, drain_timeout(workload), self.say)
                end = time.time()
                host_busy = host_busy_seconds() - host_before
                harness_cpu = self._harness_cpu() - ours_before
            finally:
                client.close()
                samples = sampler.stop()
        finally:
            exit_code = worker.stop()
        rate_window = max(0.5, workload.duration_s / 60.0)
        summary = metrics.summarise(sent, results, samples, start, end, rate_window)
        figures = summary["figures"]
        # What neither the worker nor the harness (sender + Redis) used: other work on the host,
        # which skews the comparison. Sampling gaps make it approximate, hence the clamp.
        other = max(0.0, host_busy - harness_cpu - (figures["cpu_seconds"] or 0.0))
        figures["harness_cpu_seconds"] = harness_cpu
        figures["other_cpu_seconds"] = other
        figures["other_cpu_share"] = other / (figures["window_s"] * self.plan.cpus)
        return {"exit_code": exit_code, "rate_window_s": rate_window, **summary}

    def _harness_cpu(self) -> float:
        """This process (sender, collector, sampler) plus the private Redis."""
        redis_cpu = process_cpu_seconds(self.redis_pid) if self.redis_pid else 0.0
        return process_cpu_seconds(os.getpid()) + redis_cpu


def one_line(record: dict[str, Any]) -> str:
    if "figures" not in record:
        return f"FAILED: {record['failure']}"
    f = record["figures"]
    lat = f["latency_ms"]
    text = (f"{record['status']}: sent {f['sent']} done {f['completed']} lost {f['lost']}"
            f" | {f['throughput_per_s']:.0f}/s | p50 {lat['p50']:.1f} p99 {lat['p99']:.1f} ms"
            f" | cpu {f['cpu_seconds']:.2f}s | {f['process_seconds']:.1f} proc-s"
            f" | {record['wall_s']:.1f}s wall")
    budget = record.get("memory_budget")
    if budget:
        peak = budget["peak_bytes"]
        text += (f" | budget {budget['limit_bytes'] / 2**20:.0f} MiB: peak "
                 f"{'?' if peak is None else f'{peak / 2**20:.0f}'} MiB, {budget['oom_kills']} OOM kill(s)")
    if f.get("other_cpu_share", 0) > 0.10:
        text += f" | host busy: others took {f['other_cpu_share']:.0%} of the CPUs"
    if record["failure"]:
        text += f" | {record['failure']}"
    return text
