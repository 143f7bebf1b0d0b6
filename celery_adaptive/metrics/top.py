"""``celery adaptive top``: every worker's pool, children and latency, read from Redis.

Reads what the publisher writes (`store` documents the keys): the ``P:workers`` index, then
each worker's latest snapshot. `render` is pure (snapshots and the time in, lines out) and
keeps every line within the width, 80 columns by default.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import click

from celery_adaptive.metrics.store import (
    index_key,
    key_prefix,
    latest_key,
    make_client,
    resolve_redis_url,
    safe_url,
    server_time,
)

DEFAULT_WIDTH = 80
MAX_TASK_ROWS = 5
CLEAR = "\x1b[H\x1b[2J"


# ---------------------------------------------------------------------------- reading
def load_snapshots(client: Any, prefix: str) -> list[dict[str, Any]]:
    """The latest snapshot of every worker in the index whose key has not expired.

    Each gets ``seen_s``: seconds since it was published, by the Redis server's clock (the
    index scores and ``TIME``), so a worker whose clock is off is not shown as stale or fresh
    for that reason.
    """
    members = client.zrange(index_key(prefix), 0, -1, withscores=True)
    if not members:
        return []
    now = server_time(client)
    hosts = [(h.decode() if isinstance(h, bytes) else str(h), float(score)) for h, score in members]
    raw = client.mget([latest_key(prefix, h) for h, _ in hosts])
    out: list[dict[str, Any]] = []
    for (_host, published), value in zip(hosts, raw, strict=True):
        if value is None:
            continue
        try:
            snapshot = json.loads(value)
        except ValueError:
            continue
        if isinstance(snapshot, dict):
            snapshot["seen_s"] = max(0.0, now - published)
            out.append(snapshot)
    return sorted(out, key=lambda s: str(s.get("hostname", "")))


# ---------------------------------------------------------------------------- formatting
def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.01:
        return f"{value * 1000:.1f}ms"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 100:
        return f"{value:.1f}s"
    if value < 6000:
        return f"{value / 60:.1f}m"
    return f"{value / 3600:.1f}h"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if abs(value) < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}T"  # pragma: no cover - the loop always returns


def fmt_percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.0f}%"


def fmt_cpu(percent: float | None) -> str:
    return "-" if percent is None else f"{percent:.1f}"


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}/s"


def short_task(name: str | None, width: int) -> str:
    """A task name in ``width`` columns: drop leading package parts first, then cut the left."""
    if not name:
        return ""
    parts = name.split(".")
    while len(parts) > 2 and len(".".join(parts)) > width:
        parts = parts[1:]
    text = ".".join(parts)
    return text if len(text) <= width else "~" + text[-(width - 1):]


def _clip(lines: Iterable[str], width: int) -> list[str]:
    return [line if len(line) <= width else line[: width - 1] + "~" for line in lines]


def _pcts(stats: Mapping[str, Any] | None) -> str:
    if not isinstance(stats, Mapping):
        return "p50 -  p95 -  p99 -"
    return "  ".join(f"p{q} {fmt_seconds(stats.get(f'p{q}'))}" for q in (50, 95, 99))


# ---------------------------------------------------------------------------- rendering
def render_worker(snapshot: Mapping[str, Any], now: float, width: int = DEFAULT_WIDTH) -> list[str]:
    pool = snapshot.get("pool") or {}
    children_info = pool.get("children") or {}
    tasks = pool.get("tasks") or {}
    taken_at = snapshot.get("taken_at")
    interval = float(snapshot.get("interval") or 2.0)
    seen = snapshot.get("seen_s")  # server time (load_snapshots); else the reader's clock
    if isinstance(seen, (int, float)):
        age: float | None = float(seen)
    else:
        age = None if taken_at is None else max(0.0, now - float(taken_at))
    stale = age is not None and age > 3 * interval
    seen = "-" if age is None else f"{age:.1f}s ago" + (" STALE" if stale else "")
    status = (
        f"  children {children_info.get('current', '-')}/{children_info.get('target', '-')}"
        f" [{children_info.get('min', '-')}..{children_info.get('max', '-')}]  seen {seen}"
    )
    hostname = str(snapshot.get("hostname", "?"))
    room = max(12, width - len(status))
    if len(hostname) > room:
        hostname = hostname[: room - 1] + "~"
    lines = [
        hostname + status,
        f" pool   util {fmt_percent(pool.get('utilization'))}  cpu {fmt_cpu(pool.get('cpu_percent'))}%"
        f"  rss {fmt_bytes(pool.get('rss_bytes'))}  queued {pool.get('queued', '-')}"
        f"  running {pool.get('in_flight', '-')}",
        f" tasks  recv {tasks.get('received', '-')}  ok {tasks.get('succeeded', '-')}"
        f"  fail {tasks.get('failed', '-')}  lost {tasks.get('lost', '-')}"
        f"  in {fmt_rate(pool.get('arrivals_per_s'))}  out {fmt_rate(pool.get('completions_per_s'))}"
        + (f"  backlog {pool['broker_backlog']}" if "broker_backlog" in pool else ""),
    ]
    latency = snapshot.get("latency") or {}
    overall = latency.get("overall") or {}
    lines.append(f" wait   {_pcts(overall.get('wait'))}   (n={overall.get('count', 0)}, {fmt_seconds(latency.get('window_s'))})")
    lines.append(f" run    {_pcts(overall.get('run'))}")
    host = snapshot.get("host") or {}
    load = host.get("load_average")
    load_text = " ".join(f"{x:.2f}" for x in load) if isinstance(load, (list, tuple)) else "-"
    memory = host.get("memory_percent")
    memory_text = "-" if memory is None else f"{memory:.0f}%"
    lines.append(f" host   cpu {fmt_cpu(host.get('cpu_percent'))}%  load {load_text}  mem {memory_text}")
    scaler = snapshot.get("autoscaler") or {}
    if scaler:
        forecast = scaler.get("forecast") or {}
        change = scaler.get("change") or scaler.get("decision") or {}
        parts = []
        if forecast:
            parts.append(f"forecast {fmt_rate(forecast.get('predicted_rate'))}")
        if change:
            parts.append(f"last {change.get('direction', '?')} -> {change.get('target', '?')}")
        lines.append(" scale  " + "  ".join(parts))
        if change.get("reason"):
            lines.append(f"        {change['reason']}")
    # 57 columns of numbers leave 23 for the task on an 80-column terminal.
    task_width = max(8, width - 57)
    lines.append(f"  {'PID':>7} {'CPU':>3} {'STATE':<8} {'UTIL':>4} {'CPU%':>5} {'RSS':>6} {'DONE':>6} {'QUE':>3} {'STL':>3}  TASK")
    for child in snapshot.get("children") or []:
        running = child.get("task_running_s")
        suffix = f" {fmt_seconds(running)}" if running is not None else ""
        task = short_task(child.get("task_name"), task_width - len(suffix)) + suffix if child.get("task_name") else ""
        cpu = child.get("cpu")
        lines.append(
            f"  {child.get('pid', '?'):>7} {'-' if cpu is None else cpu:>3} {str(child.get('state', '?')):<8}"
            f" {fmt_percent(child.get('utilization')):>4} {fmt_cpu(child.get('cpu_percent')):>5}"
            f" {fmt_bytes(child.get('rss_bytes')):>6} {child.get('tasks_done', 0):>6}"
            f" {child.get('local_queue', 0):>3} {child.get('steals', 0):>3}  {task}".rstrip()
        )
    by_task = latency.get("tasks") or {}
    if by_task:
        name_width = max(10, width - 51)
        lines.append(f"  {'TASK':<{name_width}} {'N':>6} {'WAIT p95':>9} {'RUN p50':>9} {'RUN p95':>9} {'RUN p99':>9}")
        busiest = sorted(by_task.items(), key=lambda kv: (-int(kv[1].get("count", 0)), kv[0]))
        for name, stats in busiest[:MAX_TASK_ROWS]:
            wait = stats.get("wait") or {}
            run = stats.get("run") or {}
            lines.append(
                f"  {short_task(name, name_width):<{name_width}} {stats.get('count', 0):>6}"
                f" {fmt_seconds(wait.get('p95')):>9} {fmt_seconds(run.get('p50')):>9}"
                f" {fmt_seconds(run.get('p95')):>9} {fmt_seconds(run.get('p99')):>9}"
            )
    return _clip(lines, width)


def render(snapshots: Sequence[Mapping[str, Any]], now: float, width: int = DEFAULT_WIDTH,
           source: str = "") -> list[str]:
    """The whole screen: a header, then one block per worker."""
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    header = f"celery-adaptive top  {len(snapshots)} worker(s)  {clock}"
    if source:
        header += f"  {source}"
    lines = [header, "-" * min(width, DEFAULT_WIDTH)]
    if not snapshots:
        lines.append("no worker is publishing metrics here (is the pool running with metrics on?)")
    for index, snapshot in enumerate(snapshots):
        if index:
            lines.append("")
        lines.extend(render_worker(snapshot, now, width))
    return _clip(lines, width)


# ---------------------------------------------------------------------------- command
def _app_from_context(ctx: click.Context, app_name: str | None) -> Any:
    if app_name:
        from celery.app.utils import find_app

        return find_app(app_name)
    return getattr(ctx.obj, "app", None)


@click.command(name="top", help="Live view of every worker's pool, read from the metrics Redis.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit (no screen refresh).")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--redis-url", default=None,
              help="Metrics Redis (default: adaptive_metrics_redis_url, else the app's broker if Redis).")
@click.option("--prefix", default=None, help="Key prefix (default: adaptive_metrics_key_prefix).")
@click.option("--app", "app_name", default=None,
              help="Celery app to read settings from when not run as `celery -A APP adaptive top`.")
@click.option("--width", type=int, default=None, help="Columns (default: the terminal's, at most 80 when piped).")
@click.pass_context
def top_command(ctx: click.Context, once: bool, interval: float, redis_url: str | None,
                prefix: str | None, app_name: str | None, width: int | None) -> None:
    app = _app_from_context(ctx, app_name)
    conf = app.conf if app is not None else {}
    url = resolve_redis_url(conf, redis_url)
    if url is None:
        raise click.UsageError(
            "no metrics Redis: pass --redis-url, set adaptive_metrics_redis_url, or use a Redis broker"
        )
    prefix = prefix or key_prefix(conf)
    tty = sys.stdout.isatty()
    if width is None:
        width = shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns if tty else DEFAULT_WIDTH
    client = make_client(url, timeout=2.0)
    source = safe_url(url)
    import redis

    try:
        while True:
            try:
                lines = render(load_snapshots(client, prefix), time.time(), width, source)
            except (redis.RedisError, OSError) as exc:
                if once:
                    raise click.ClickException(f"cannot read metrics from {source}: {exc}") from None
                lines = [f"cannot read metrics from {source}: {exc}"[:width]]
            screen = "\n".join(lines)
            if once:
                click.echo(screen)
                return
            # On a terminal, redraw in place; piped, append one block per refresh.
            click.echo(CLEAR + screen if tty else screen + "\n")
            time.sleep(max(0.1, interval))
    except KeyboardInterrupt:
        return
    finally:
        client.close()
