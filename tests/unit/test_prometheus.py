"""The Prometheus exposition of a snapshot: names, labels, cardinality and promtool's lint."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.promlint import lint
from tests.snapshots import HOSTNAME, full_snapshot

prometheus_client = pytest.importorskip("prometheus_client")


def exposition(snapshot) -> str:
    from celery_adaptive.metrics.prometheus import _Collector

    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(_Collector(lambda: snapshot))
    return prometheus_client.generate_latest(registry).decode()


def test_exposition_has_conventional_names_and_labels():
    text = exposition(full_snapshot())
    host = f'hostname="{HOSTNAME}"'
    for line in (
        f'celery_adaptive_pool_processes{{{host},state="busy"}} 1.0',
        f"celery_adaptive_pool_target_processes{{{host}}} 4.0",
        f"celery_adaptive_pool_max_processes{{{host}}} 8.0",
        f"celery_adaptive_task_received_total{{{host}}} 40.0",
        f"celery_adaptive_task_lost_total{{{host}}} 1.0",
        f"celery_adaptive_process_crashed_total{{{host}}} 1.0",
        f'celery_adaptive_process_cpu_usage_ratio{{{host},slot="0"}} 0.95',
        f'celery_adaptive_process_resident_memory_bytes{{{host},slot="2"}} 2e+07',
        f"celery_adaptive_autoscaler_forecast_arrivals_per_second{{{host}}} 14.25",
        f"celery_adaptive_autoscaler_desired_processes{{{host}}} 4.0",
        f'celery_adaptive_autoscaler_decisions_total{{cause="forecast",direction="up",{host}}} 2.0',
        f"celery_adaptive_broker_backlog_messages{{{host}}} 3.0",
    ):
        assert line in text, line
    # Histograms: six runs of each task; the stamped ones (odd i) have a queue wait.
    assert (f'celery_adaptive_task_runtime_seconds_count{{{host},name="proj.tasks.resize",queue_name="images"}} 6.0'
            in text)
    assert (f'celery_adaptive_task_queue_wait_seconds_count{{{host},name="proj.tasks.email",queue_name="celery"}} 6.0'
            in text)
    assert 'celery_adaptive_task_queue_wait_seconds_count{hostname="celery@web-1",name="proj.tasks.resize"' not in text
    assert f'celery_adaptive_pool_wait_seconds_bucket{{{host},le="+Inf"}} 12.0' in text
    # Bounded labels only: a slot, never a pid; no unmeasured sample (slot 2's CPU).
    assert "pid=" not in text and "40001" not in text
    assert 'celery_adaptive_process_cpu_usage_ratio{hostname="celery@web-1",slot="2"}' not in text


def test_exposition_passes_the_metric_lint():
    assert lint(exposition(full_snapshot())) == []


def test_the_lint_catches_what_promtool_rejects():
    bad = (
        "# HELP req_ms Time.\n# TYPE req_ms gauge\nreq_ms 1\n"
        "# HELP cpu_percent CPU.\n# TYPE cpu_percent gauge\ncpu_percent 1\n"
        "# HELP size_kilobytes Size.\n# TYPE size_kilobytes gauge\nsize_kilobytes 1\n"
        "# HELP done Done.\n# TYPE done counter\ndone 1\n"
        "# TYPE nohelp gauge\nnohelp 1\n"
        "# HELP queue_gauge Q.\n# TYPE queue_gauge gauge\nqueue_gauge 1\n"
        "# HELP busyRatio B.\n# TYPE busyRatio gauge\nbusyRatio 1\n"
        "# HELP lat Lat.\n# TYPE lat gauge\nlat{quantile=\"0.5\"} 1\n"
        "# HELP dup Dup.\n# TYPE dup gauge\ndup{a=\"1\"} 1\ndup{a=\"1\"} 2\n"
    )
    problems = "\n".join(lint(bad))
    for expected in (
        "req_ms metric names should not contain abbreviated units",
        'cpu_percent use base unit "ratio" instead of "percent"',
        'size_kilobytes use base unit "bytes" instead of "kilobytes"',
        'done counter metrics should have "_total" suffix',
        "nohelp no help text",
        "queue_gauge metric name should not include type 'gauge'",
        "busyRatio metric names should be written in 'snake_case'",
        'lat non-summary metrics should not have "quantile" label',
        "dup duplicate series",
    ):
        assert expected in problems, (expected, problems)


def test_promtool_agrees_when_it_is_installed():
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed (the Python port above is what CI relies on)")
    checked = subprocess.run([promtool, "check", "metrics"], input=exposition(full_snapshot()),
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_no_snapshot_no_samples():
    from celery_adaptive.metrics.prometheus import _Collector

    empty = prometheus_client.CollectorRegistry(auto_describe=False)
    empty.register(_Collector(lambda: None))
    assert prometheus_client.generate_latest(empty) == b""
