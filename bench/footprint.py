"""What one worker's metrics cost in Redis: bytes kept and bytes written per hour.

    python -m bench.footprint                       # this checkout
    python -m bench.footprint --source ../other     # another checkout's celery_adaptive (before/after)

Runs a real worker (``tests.apps.proj``, ``-c 4``) of the checkout named by ``--source`` on a
private broker Redis, with its metrics in a second private Redis (so nothing else writes
there), sends a light mix of tasks for ``--seconds`` with snapshots every ``--interval``
seconds, then measures the metrics Redis:

- ``MEMORY USAGE`` of every key under the prefix, and the stream's bytes per entry;
- ``total_net_input_bytes`` (INFO stats) over the run, per snapshot published.

and scales both to one hour at the default interval (2 s) under the source's own default
caps (``adaptive_metrics_stream_length``, and ``adaptive_metrics_stream_max_age`` where the
source has it): kept = the latest snapshot + the index + as many stream entries as the caps
allow; written = 1800 snapshots' traffic. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from celery_adaptive.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INTERVAL = 2.0
HOUR = 3600.0
PREFIX = "celery-adaptive"
HOSTNAME = "footprint@localhost"


def _defaults(source: Path) -> dict[str, Any]:
    code = (
        "import json\nfrom celery_adaptive.settings import DEFAULTS\n"
        "print(json.dumps({k: DEFAULTS.get(k) for k in "
        "('adaptive_metrics_stream_length', 'adaptive_metrics_stream_max_age', 'adaptive_metrics_interval')}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(source)), check=True)
    return dict(json.loads(done.stdout))


def _net_in(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_input_bytes"])


def measure(source: Path, seconds: float, interval: float, concurrency: int) -> dict[str, Any]:
    defaults = _defaults(source)
    with EmbeddedRedis() as broker, EmbeddedRedis() as metrics_server:
        metrics = redis.Redis.from_url(metrics_server.url)
        env = dict(os.environ, PYTHONPATH=str(source), PYTHONUNBUFFERED="1",
                   TEST_BROKER_URL=broker.url, TEST_QUEUE="footprint",
                   TEST_METRICS_REDIS_URL=metrics_server.url, TEST_METRICS_INTERVAL=str(interval))
        for name in ("TEST_METRICS_TTL", "TEST_METRICS_STREAM_LENGTH", "TEST_METRICS_PROMETHEUS_PORT"):
            env.pop(name, None)
        net_before = _net_in(metrics)
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.apps.proj", "worker", "-P", "celery_adaptive:Pool",
             "-c", str(concurrency), "-Q", "footprint", "-n", HOSTNAME, "--without-gossip",
             "--without-mingle", "--without-heartbeat", "-l", "warning"],
            cwd=source, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            from celery import Celery

            client = Celery("footprint", broker=broker.url)
            deadline = time.monotonic() + seconds
            sent = 0
            while time.monotonic() < deadline and worker.poll() is None:
                # A few task names, short and longer, so per-task latency and busy children
                # appear in the snapshots as they would in production.
                name = ("add", "pid", "sleep")[sent % 3]
                args: tuple[Any, ...] = (1, 2) if name == "add" else (0.2,) if name == "sleep" else ()
                client.send_task(f"tests.apps.proj.{name}", args=args, queue="footprint", ignore_result=True)
                sent += 1
                time.sleep(0.05)
            client.close()
            latest_raw = metrics.get(f"{PREFIX}:worker:{HOSTNAME}")
            if latest_raw is None:
                raise SystemExit("the worker published no snapshot: is the source's pool working?")
            snapshots = int(json.loads(latest_raw)["seq"])
            net = _net_in(metrics) - net_before
            keys = sorted(k.decode() for k in metrics.scan_iter(match=f"{PREFIX}:*"))
            usage = {k: int(metrics.memory_usage(k, samples=0) or 0) for k in keys}
            stream = f"{PREFIX}:stream:{HOSTNAME}"
            entries = int(metrics.xlen(stream))
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(10)
        metrics.close()
    stream_bytes = usage.get(stream, 0)
    per_entry = stream_bytes / entries if entries else 0.0
    other_bytes = sum(v for k, v in usage.items() if k != stream)
    per_hour = HOUR / DEFAULT_INTERVAL
    caps = [per_hour, float(defaults["adaptive_metrics_stream_length"])]
    if defaults.get("adaptive_metrics_stream_max_age"):
        caps.append(float(defaults["adaptive_metrics_stream_max_age"]) / DEFAULT_INTERVAL)
    kept_entries = min(caps)
    return {
        "source": str(source),
        "run": {"seconds": seconds, "interval": interval, "concurrency": concurrency,
                "tasks_sent": sent, "snapshots": snapshots},
        "keys": usage,
        "stream": {"entries": entries, "bytes": stream_bytes, "bytes_per_entry": round(per_entry, 1)},
        "written_bytes_per_snapshot": round(net / snapshots, 1) if snapshots else None,
        "defaults": defaults,
        "per_worker_per_hour_at_2s": {
            "snapshots": int(per_hour),
            "stream_entries_kept": int(kept_entries),
            "bytes_kept": int(other_bytes + per_entry * kept_entries),
            "bytes_written": int(net / snapshots * per_hour) if snapshots else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT, help="checkout whose celery_adaptive runs")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.1, help="snapshot interval during the run")
    parser.add_argument("-c", "--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    result = measure(args.source.resolve(), args.seconds, args.interval, args.concurrency)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
