"""pytest plugin that points Celery's own integration suite at the pool under test.

Loaded with ``-p celery_conformance_plugin`` by scripts/celery-conformance.sh. Celery's
``t/integration/conftest.py`` defines ``celery_worker_pool`` (returning ``'prefork'``), and a
conftest beats any plugin in pytest's fixture lookup; so when that conftest module is
registered, this plugin swaps its ``celery_worker_pool`` attribute for one that returns
``$CONFORMANCE_POOL``, before pytest reads the module's fixtures. Nothing on disk changes.

``$CONFORMANCE_TEST_TIMEOUT`` (seconds) caps every test's pytest-timeout, including the
``timeout(300)`` marks Celery puts on its flaky tests, so one hang cannot eat a whole run.

The session worker's class forwards its children's log records to the test process, as
``celery.contrib.testing``'s ``TestWorkController`` does, but for any pool whose tasks run in
child processes: Celery's class does it only when the pool's module is named ``prefork``, so
tests that read the children's log records (``test_trace_log_arguments``) could only pass on
prefork. With prefork nothing changes.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
from typing import Any

import pytest

POOL_ENV = "CONFORMANCE_POOL"
TIMEOUT_ENV = "CONFORMANCE_TEST_TIMEOUT"


def _pool() -> str:
    return os.environ.get(POOL_ENV) or "prefork"


@pytest.fixture(scope="session", name="celery_worker_pool")
def _conformance_worker_pool() -> str:
    return _pool()


@pytest.fixture(scope="session", name="celery_worker_parameters")
def _conformance_worker_parameters() -> dict[str, Any]:
    return {"WorkController": _forwarding_work_controller()}


def _forwarding_work_controller() -> type:
    from billiard import Queue
    from celery.contrib.testing.worker import TestWorkController

    class ForwardingWorkController(TestWorkController):  # type: ignore[misc]
        """TestWorkController, with its child-log forwarding for every multi-process pool."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            in_process = getattr(self.pool_cls, "is_green", False) or self.pool_cls.__module__.endswith(
                (".solo", ".thread")
            )
            if self.logger_queue is None and not in_process:
                # What TestWorkController.__init__ does for prefork, word for word.
                self.logger_queue = Queue()
                self.pid = os.getpid()
                self.queue_listener = logging.handlers.QueueListener(self.logger_queue, logging.getLogger())
                self.queue_listener.start()

    return ForwardingWorkController


@pytest.hookimpl(tryfirst=True)
def pytest_plugin_registered(plugin: Any) -> None:
    name = getattr(plugin, "__name__", "")
    if name.endswith("integration.conftest") and hasattr(plugin, "celery_worker_pool"):
        plugin.celery_worker_pool = _conformance_worker_pool
        if not hasattr(plugin, "celery_worker_parameters"):
            plugin.celery_worker_parameters = _conformance_worker_parameters


def pytest_report_header(config: pytest.Config) -> str:
    return f"celery conformance: session worker pool = {_pool()}"


def _marked_timeout(item: pytest.Item) -> float | None:
    marker = item.get_closest_marker("timeout")
    if marker is None:
        return None
    value = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
    return None if value is None else float(value)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    cap = os.environ.get(TIMEOUT_ENV)
    if not cap:
        return  # pytest-timeout's --timeout covers unmarked tests
    seconds = float(cap)
    for item in items:
        marked = _marked_timeout(item)
        if marked is not None and marked > seconds:
            # Prepended, so it is the closest timeout marker pytest-timeout finds.
            item.add_marker(pytest.mark.timeout(seconds), append=False)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: Any) -> Any:
    result = yield
    if fixturedef.argname == "celery_session_worker":
        from celery.concurrency import get_implementation

        # A run that silently used prefork would compare prefork with itself.
        got, wanted = getattr(result, "pool_cls", None), get_implementation(_pool())
        if got is not wanted:
            raise RuntimeError(f"the session worker runs pool {got!r}, not {wanted!r} ({_pool()})")
    return result
