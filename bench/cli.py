"""``python -m bench run|report``: parse arguments, own the private Redis, write the folder.

Folder layout (``<out>/<YYYY-MM-DDTHHMM>/``): ``meta.json`` (what was asked), ``runs/*.json``
(one record per run, raw), ``logs/*.log`` (worker output), ``summary.md``, ``plots/*.png``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench import plots, report
from bench.pools import resolve
from bench.workloads import BUILDERS, Sizing, build, machine_cpus

DEFAULT_WORKLOADS = ",".join(BUILDERS)
DEFAULT_POOLS = "prefork,prefork-autoscale,threads,solo,adaptive"


def say(text: str) -> None:
    print(text, flush=True)


def _csv(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return list(dict.fromkeys(items))  # de-duplicate, keep order


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run workloads against pools and write a results folder")
    run.add_argument("--workloads", type=_csv, default=_csv(DEFAULT_WORKLOADS),
                     help=f"comma-separated, from: {DEFAULT_WORKLOADS} (default: all)")
    run.add_argument("--pools", type=_csv, default=_csv(DEFAULT_POOLS),
                     help="comma-separated: adaptive, prefork, prefork-autoscale, threads, solo or"
                          f" module:Class (default: {DEFAULT_POOLS})")
    run.add_argument("--concurrency", "-c", type=int, default=None,
                     help="worker concurrency (default: CPUs in this process's affinity mask)")
    run.add_argument("--repeat", type=int, default=3, help="repetitions (default: 3)")
    run.add_argument("--baseline", default="prefork", help="pool the ratios divide by")
    run.add_argument("--quick", action="store_true", help="tiny sizes: every workload in seconds")
    run.add_argument("--seed", type=int, default=20261127, help="schedule seed")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="override a workload parameter, e.g. duration_s=30 or idle_s=12")
    run.add_argument("--memory-budget", default=None, metavar="SIZE",
                     help="run each worker in a fresh memory cgroup limited to SIZE ('384MiB', "
                          "'1GB', or KiB); needs root or a delegated cgroup")
    run.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                     help="parent of the dated results folder (default: bench/results)")
    rep = sub.add_parser("report", help="rewrite summary.md and plots of an existing folder")
    rep.add_argument("folder", type=Path)
    return root


def results_folder(parent: Path) -> Path:
    stamp = time.strftime("%Y-%m-%dT%H%M")
    for n in range(1, 1000):
        folder = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a results folder under {parent}")


def write_report(folder: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    (folder / "summary.md").write_text(report.render(records, meta, meta["time_varying"]))
    written = plots.write_all(records, meta["pools"], meta["time_varying"], folder / "plots")
    say(f"wrote {folder / 'summary.md'} and {len(written)} plot(s) in {folder / 'plots'}")


def _param(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--param wants KEY=VALUE, got {text!r}")
    return key.strip(), float(value)


def cmd_run(args: argparse.Namespace) -> int:
    # Imported here: the runner pulls in celery and redis, which `report` does not need.
    from bench.runner import BACKEND_DB, BROKER_DB, Plan, Runner, host_info
    from celery_adaptive.embedded_redis import EmbeddedRedis

    cpus = machine_cpus()
    concurrency = args.concurrency or cpus
    try:
        pools = tuple(resolve(name, concurrency) for name in args.pools)
        overrides = dict(_param(p) for p in args.param)
        sizing = Sizing(cpus, args.quick, args.seed, overrides)
        time_varying = {name: build(name, sizing).time_varying for name in args.workloads}
    except ValueError as exc:
        say(f"error: {exc}")
        return 2
    if args.repeat < 1:
        say("error: --repeat must be >= 1")
        return 2
    budget = None
    if args.memory_budget is not None:
        from bench.cgroup import CgroupUnavailable, MemoryBudget
        from celery_adaptive.errors import SettingsError
        from celery_adaptive.memory.sizes import parse_amount

        try:
            budget = parse_amount("--memory-budget", args.memory_budget, allow_share=False).size
            assert budget is not None
            MemoryBudget(budget).close()  # can one be made here at all?
        except (SettingsError, CgroupUnavailable) as exc:
            say(f"error: {exc}")
            return 2
    folder = results_folder(args.out)
    plan = Plan(tuple(args.workloads), pools, args.repeat, concurrency, cpus, args.quick,
                args.seed, args.baseline, folder, overrides, budget)
    meta = {
        "stamp": folder.name, "command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
        "workloads": list(args.workloads), "pools": [p.name for p in pools],
        "pool_args": {p.name: list(p.args) for p in pools}, "baseline": args.baseline,
        "concurrency": concurrency, "repeat": args.repeat, "quick": args.quick, "params": overrides,
        "seed": args.seed, "host": host_info(plan), "time_varying": time_varying,
        "memory_budget": budget,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    say(f"results: {folder}")
    if args.baseline not in meta["pools"]:
        say(f"note: baseline {args.baseline!r} is not among the pools; no ratios")
    # SIGTERM (a `kill`, a CI timeout) unwinds like Ctrl-C, so the worker and Redis this run
    # started are stopped by their context managers instead of being left behind.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        with EmbeddedRedis() as server:
            say(f"private redis: {server.url}")
            redis_pid = server.process.pid if server.process else None
            runner = Runner(plan, server.url_for_db(BROKER_DB), server.url_for_db(BACKEND_DB),
                            say, redis_pid)
            records = runner.run_all()
    except KeyboardInterrupt:
        # Workers and Redis were stopped on the way out; finished runs are on disk.
        say(f"interrupted; finished runs are in {folder / 'runs'}; "
            f"`python -m bench report {folder}` summarises them")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    write_report(folder, records, meta)
    failed = [r["run_id"] for r in records if r["status"] != "ok"]
    if failed:
        say(f"{len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    folder: Path = args.folder
    meta = json.loads((folder / "meta.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]
    write_report(folder, records, meta)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    return cmd_report(args)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
