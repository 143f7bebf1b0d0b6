"""Django's database connections around forks, with real workers on the project in
tests/django_project (sqlite always; a psycopg connection pool when PostgreSQL answers on
127.0.0.1:5432, database ``test``, trust auth).

Celery's Django fixup closes the parent's connections at worker_init and, for a pool whose
module name says "prefork", psycopg connection pools too (celery/fixups/django.py,
``DjangoWorkerFixup._is_prefork``). This pool must get the same: no child inherits an open
connection or pool from the parent, and children never share a database session.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support import POOL, Broker, wait_until

pytestmark = pytest.mark.integration
pytest.importorskip("django")

APP = "tests.django_project.celery_app"
POOLS = [pytest.param(["-P", "prefork"], id="prefork"), pytest.param(["-P", POOL], id="adaptive")]


def _postgres_reason() -> str | None:
    """Why the psycopg pool part cannot run here, or None when it can."""
    import django

    if django.VERSION < (5, 1):
        return f"Django {django.get_version()} has no connection pools (5.1+)"
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        return f"psycopg with psycopg_pool is not installed ({exc})"
    try:
        with psycopg.connect("host=127.0.0.1 port=5432 dbname=test user=postgres",
                             connect_timeout=3):
            pass
    except Exception as exc:
        return f"no PostgreSQL on 127.0.0.1:5432 (database test, trust auth): {exc}"
    return None


PG_REASON = _postgres_reason()
if PG_REASON:
    # Said once per run, so a skipped pool check is visible in the log.
    print(f"test_django: psycopg pool checks skipped: {PG_REASON}")


def _env(tmp_path: Path, open_at: str) -> dict[str, str]:
    env = {
        "DJANGO_SETTINGS_MODULE": "tests.django_project.settings",
        "TEST_SQLITE_PATH": str(tmp_path / "db.sqlite3"),
        "TEST_DJANGO_DIR": str(tmp_path),
        "TEST_DJANGO_OPEN": open_at,
    }
    if PG_REASON is None:
        env["TEST_DJANGO_PG"] = "1"
    return env


def _read(tmp_path: Path, prefix: str) -> dict[int, dict[str, Any]]:
    found = {}
    for path in tmp_path.glob(f"{prefix}-*.json"):
        found[int(path.stem.rsplit("-", 1)[1]) if prefix == "child" else 0] = json.loads(path.read_text())
    return found


def _identities(broker: Broker, count: int) -> list[dict[str, Any]]:
    results = [broker.app.send_task("tests.django_project.celery_app.db_identity", queue=broker.queue)
               for _ in range(count)]
    return [r.get(timeout=30) for r in results]


NOTHING_INHERITED = {"sqlite_open": False, "pg_connection_open": False, "pools": []}


@pytest.mark.parametrize("pool_arg", POOLS)
def test_children_inherit_no_connection_opened_before_the_worker_started(
    worker_factory, broker, pool_arg, tmp_path: Path
):
    """The parent opens sqlite and (when available) a pooled PostgreSQL connection while the
    worker loads the app. prefork's children start with none of them open and no pool; so do
    this pool's, and no two children, nor a child and the parent, share a PostgreSQL session."""
    worker = worker_factory("-c", "2", pool_arg=pool_arg, app=APP, env=_env(tmp_path, "import"))
    parent = _read(tmp_path, "parent")[0]
    assert parent["pid"] == worker.pid
    if PG_REASON is None:
        assert parent["pools"] == ["pg"]  # the parent really had a pool open
    children = wait_until(lambda: (c := _read(tmp_path, "child")) and len(c) >= 2 and c,
                          message="both children to report")
    assert set(children) == set(worker.child_pids())
    for pid, seen in children.items():
        assert seen == NOTHING_INHERITED, (pid, seen)
    identities = _identities(broker, 6)
    # The fixup closes connections and (prefork-style) pools around every task.
    assert all(i["pools_before"] == [] for i in identities), identities
    if PG_REASON is None:
        by_child: dict[int, set[int]] = {}
        for i in identities:
            by_child.setdefault(i["pid"], set()).add(i["pg_backend"])
        sessions = [b for backends in by_child.values() for b in backends]
        assert parent["pg_backend"] not in sessions
        assert len(sessions) == len(set(sessions)), by_child  # no session in two children


def test_replacement_children_inherit_nothing_opened_while_the_worker_runs(
    worker_factory, broker, tmp_path: Path
):
    """Before every fork, not only at worker_init: the parent opens connections once the
    worker runs (worker_ready) and a child is then replaced; the replacement inherits none of
    them. (prefork does not close in the parent here: its replacement inherits them, and
    the fixup's worker_process_init receiver drops them in the child afterwards.)"""
    worker = worker_factory("-c", "1", app=APP, env=_env(tmp_path, "ready"))
    wait_until(lambda: _read(tmp_path, "parent"), message="the parent to open connections")
    if PG_REASON is None:
        assert _read(tmp_path, "parent")[0]["pools"] == ["pg"]
    (first,) = worker.child_pids()
    os.kill(first, signal.SIGKILL)  # a child of the worker this test started
    children = wait_until(lambda: (c := _read(tmp_path, "child")) and len(c) >= 2 and c,
                          message="the replacement to report")
    replacement = max(set(children) - {first})
    assert children[replacement] == NOTHING_INHERITED
    identity = _identities(broker, 1)[0]
    assert identity["pid"] == replacement
    if PG_REASON is None:
        assert identity["pg_backend"] != _read(tmp_path, "parent")[0]["pg_backend"]
