"""The Celery app of the Django test project (tests/integration/test_django.py).

The worker's parent opens database connections at moments the test picks ($TEST_DJANGO_OPEN:
"import", while the worker loads this app, before Celery's Django fixup closes connections at
worker_init; "ready", once the worker runs, after its first children exist). Each child writes
what it inherited, seen by the first worker_process_init receiver (connected here at import,
so before the fixup's own), to $TEST_DJANGO_DIR/child-<pid>.json.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready

broker = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/15")
app = Celery("djproj", broker=broker, backend=broker, include=["tests.django_project.celery_app"])
app.conf.update(
    worker_pool=os.environ.get("TEST_WORKER_POOL") or None,
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
)
PG = bool(os.environ.get("TEST_DJANGO_PG"))


def _write(name: str, data: dict[str, Any]) -> None:
    directory = os.environ["TEST_DJANGO_DIR"]
    with open(os.path.join(directory, f"{name}.tmp"), "w") as out:
        json.dump(data, out)
    os.replace(os.path.join(directory, f"{name}.tmp"), os.path.join(directory, f"{name}.json"))


def _pg_backend_pid() -> int:
    from django.db import connections

    with connections["pg"].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def _pools() -> list[str]:
    from django.db import connections

    if not PG:
        return []
    return sorted(getattr(type(connections["pg"]), "_connection_pools", {}))


def open_in_parent(moment: str) -> None:
    import django
    from django.db import connections

    django.setup()
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")
    parent: dict[str, Any] = {"pid": os.getpid(), "sqlite": id(connections["default"].connection)}
    if PG:
        parent["pg_backend"] = _pg_backend_pid()  # the pool opens and lends one connection
        parent["pools"] = _pools()
    _write(f"parent-{moment}", parent)


if os.environ.get("TEST_DJANGO_OPEN") == "import":
    open_in_parent("import")


@worker_ready.connect
def _open_when_ready(**_: Any) -> None:
    if os.environ.get("TEST_DJANGO_OPEN") == "ready":
        open_in_parent("ready")


@worker_process_init.connect
def _record_inheritance(**_: Any) -> None:
    from django.db import connections

    pg = connections["pg"] if PG else None
    _write(f"child-{os.getpid()}", {
        "sqlite_open": connections["default"].connection is not None,
        "pg_connection_open": pg is not None and pg.connection is not None,
        "pools": _pools(),
    })


@app.task
def db_identity() -> dict[str, Any]:
    """Which database sessions this task ran on (the fixup closed connections before it)."""
    from django.db import connections

    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")
    out: dict[str, Any] = {"pid": os.getpid(), "pools_before": _pools()}
    if PG:
        out["pg_backend"] = _pg_backend_pid()
    return out
