"""The three documented ways to select the pool, plus Celery's in-process test worker."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.integration


def _assert_serves(worker, broker) -> None:
    assert broker.send("add", 19, 23).get(timeout=20) == 42
    assert worker.pool_info()["implementation"] == "celery_adaptive:Pool"


def test_cli_help_lists_the_pool_choice():
    out = subprocess.run(
        [sys.executable, "-m", "celery", "worker", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    ).stdout
    assert "celery_adaptive:Pool" in out


def test_dash_p_module_class(worker_factory, broker):
    worker = worker_factory("-c", "1", pool_arg=["-P", "celery_adaptive:Pool"])
    _assert_serves(worker, broker)


def test_dash_p_short_alias(worker_factory, broker):
    worker = worker_factory("-c", "1", pool_arg=["-P", "adaptive"])
    _assert_serves(worker, broker)


def test_worker_pool_setting_without_dash_p(worker_factory, broker):
    worker = worker_factory("-c", "1", pool_arg=[], env={"TEST_WORKER_POOL": "celery_adaptive:Pool"})
    _assert_serves(worker, broker)


def test_custom_pool_environment_variable(worker_factory, broker):
    worker = worker_factory(
        "-c", "1", pool_arg=["-P", "custom"], env={"CELERY_CUSTOM_WORKER_POOL": "celery_adaptive:Pool"}
    )
    _assert_serves(worker, broker)


def test_start_worker_in_process(broker):
    """Celery's test worker (a thread, no signal handlers, trace_task_ret) drives the pool too."""
    from celery.contrib.testing.worker import start_worker

    from celery_adaptive import Pool
    from tests.apps import proj

    app = proj.app
    old = (app.conf.broker_url, app.conf.result_backend)
    app.conf.broker_url = broker.url
    app.conf.result_backend = broker.url
    try:
        with start_worker(app, pool=Pool, concurrency=1, perform_ping_check=False,
                          queues=[broker.queue], shutdown_timeout=30):
            result = proj.add.apply_async((2, 2), queue=broker.queue)
            assert result.get(timeout=30) == 4
            with pytest.raises(ValueError):
                proj.boom.apply_async(queue=broker.queue).get(timeout=30)
    finally:
        app.conf.broker_url, app.conf.result_backend = old


def test_without_an_event_loop(tmp_path):
    """A transport without async support (no hub): the pool's I/O thread runs the callbacks."""
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    from celery_adaptive import Pool

    (tmp_path / "results").mkdir()
    folders = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path),
               "control_folder": str(tmp_path / "control")}
    app = Celery("nohub", broker="filesystem://", backend=f"file://{tmp_path}/results")
    app.conf.broker_transport_options = folders

    @app.task(name="nohub.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    with start_worker(app, pool=Pool, concurrency=2, perform_ping_check=False, shutdown_timeout=30) as w:
        assert w.use_eventloop is False
        assert [mul.delay(i, 3).get(timeout=30) for i in range(5)] == [0, 3, 6, 9, 12]
