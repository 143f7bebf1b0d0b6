"""``celery -A proj adaptive health``: exit 0 when the worker on this host is ready (or, with
``--live``, alive), 1 otherwise, with one line saying why. For Kubernetes exec probes::

    readinessProbe: {exec: {command: [celery, -A, proj, adaptive, health]}}
    livenessProbe:  {exec: {command: [celery, -A, proj, adaptive, health, --live]}}

It reads the status file the worker's pool rewrites every ``adaptive_health_interval``
(`monitor`), found from the worker's node name (``-n``; Celery's default ``celery@<host>``)
unless ``--file`` names it; with ``--url`` it asks the worker's HTTP endpoint instead. Neither
touches the broker, so a broker outage does not fail liveness.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from celery_adaptive.health.monitor import default_status_file, read_status_file


def _status_file(ctx: click.Context, hostname: str | None, path: str | None) -> Path:
    if path:
        return Path(path)
    app = getattr(ctx.obj, "app", None)
    configured = app.conf.get("adaptive_health_file") if app is not None else None
    if configured:
        return Path(str(configured))
    from celery.utils.nodenames import default_nodename, host_format

    return default_status_file(host_format(default_nodename(hostname)))


def _ask(url: str, live: bool, timeout: float) -> tuple[bool, str]:
    url = url.rstrip("/")
    if not url.endswith(("/healthz", "/readyz")):
        url += "/healthz" if live else "/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, f"{url}: {response.status} {response.read().decode(errors='replace').strip()}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code} {exc.read().decode(errors='replace').strip()}"
    except OSError as exc:
        return False, f"{url}: no answer ({exc})"


@click.command(name="health", help="Exit 0 if this host's worker is ready (--live: alive), else 1.")
@click.option("--live", is_flag=True, help="Liveness (the event loop turns) rather than readiness.")
@click.option("-n", "--hostname", default=None, help="The worker's node name, as given to `celery worker -n` (%h works).")
@click.option("--file", "path", default=None, help="The status file (default: adaptive_health_file, else per node name).")
@click.option("--url", default=None, help="Ask the HTTP endpoint instead, e.g. http://127.0.0.1:8001.")
@click.option("--timeout", type=float, default=2.0, show_default=True, help="Seconds to wait for --url.")
@click.pass_context
def health_command(ctx: click.Context, live: bool, hostname: str | None, path: str | None,
                   url: str | None, timeout: float) -> Any:
    if url:
        healthy, why = _ask(url, live, timeout)
    else:
        healthy, why = read_status_file(_status_file(ctx, hostname, path), live)
    click.echo(why)
    ctx.exit(0 if healthy else 1)
