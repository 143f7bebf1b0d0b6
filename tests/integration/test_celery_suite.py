"""Celery's own integration suite, as CI's bar: the --fast slice of scripts/celery-conformance.sh
runs against the adaptive pool on each broker layout that answers, and no test may fail.

The slice is the tests the pool failed before (see docs/conformance.md) plus ping/inspect
checks; the full comparison with prefork is the script without --fast. Redis is a private
server of this test (Celery's suite needs its default queue name, so only a server of its own
keeps it apart from other runs); RabbitMQ gets a virtual host of its own, removed afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import pytest

from celery_adaptive.embedded_redis import EmbeddedRedis
from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = ROOT / "scripts" / "celery-conformance.sh"


def _report_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("conformance_report", ROOT / "scripts" / "conformance" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(900)
def test_celery_integration_slice_passes_on_the_adaptive_pool(private_redis: EmbeddedRedis, tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {
        **os.environ,
        "REDIS_URL": private_redis.url,
        "CONFORMANCE_VHOST": f"celery-adaptive-conformance-{uuid.uuid4().hex[:8]}",
        "PYTHON": sys.executable,
    }
    done = subprocess.run(
        ["bash", str(SCRIPT), "--fast", "--pools", "adaptive", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840,
    )
    transcript = f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    report = _report_module()
    results = report.load(out) if out.exists() else None
    if done.returncode == 0 and (results is None or not results.runs):
        pytest.skip(f"no broker layout answered:\n{done.stderr.strip()}")
    assert results is not None, transcript
    assert not results.missing, f"runs left no results (timed out?): {results.missing}\n{transcript}"
    failures = [
        f"{layout}: {outcome.test}: {outcome.message}"
        for layout in results.layouts
        for outcome, _ in report.regressions(results, layout)
    ]
    assert not failures, "\n".join(failures) + "\n\n" + transcript
    assert done.returncode == 0, transcript
    ran = {layout for layout, _pool in results.by_run}
    assert ran, transcript
