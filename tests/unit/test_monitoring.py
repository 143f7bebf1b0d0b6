"""monitoring/: the Grafana dashboard and the Prometheus rules read only what the endpoint
exports (the exposition of a snapshot with everything measured), and have the expected shape.
promtool, when installed, also parses every query and the rules file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.snapshots import full_snapshot

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
RULES = ROOT / "monitoring" / "prometheus-rules.yml"

prometheus_client = pytest.importorskip("prometheus_client")

METRIC = re.compile(r"\bcelery_adaptive_[a-z0-9_]+")
LABEL_USE = re.compile(r"(?:by|on|without)\s*\(([^)]*)\)|([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"|\{\{\s*\$?(?:labels\.)?([a-z_]+)\s*\}\}")
PROMQL_LABEL_NOISE = {"humanize", "humanizeDuration", "value"}


def _exported() -> tuple[set[str], set[str]]:
    """Sample names and label names of the exposition (histograms as _bucket/_sum/_count)."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.unit.test_prometheus import exposition

    names: set[str] = set()
    labels: set[str] = set()
    for family in text_string_to_metric_families(exposition(full_snapshot())):
        for sample in family.samples:
            names.add(sample.name)
            labels.update(sample.labels)
    return names, labels


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            out.append((f"variable {variable['name']}", variable["definition"]))
    return out


def _labels_used(text: str) -> set[str]:
    used: set[str] = set()
    for by, matcher, template in LABEL_USE.findall(text):
        used.update(part.strip() for part in by.split(",") if part.strip())
        used.update(x for x in (matcher, template) if x)
    return used - PROMQL_LABEL_NOISE


def test_dashboard_has_the_panels_operators_need():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    for needed in ("Pool size vs target vs load", "Utilisation per child", "Queue wait p99",
                   "Scaling decisions by cause", "Restarts and losses"):
        assert needed in titles
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_dashboard_queries_use_only_exported_metrics_and_labels():
    names, labels = _exported()
    for title, expr in _dashboard_queries():
        used = set(METRIC.findall(expr))
        assert used, f"{title}: {expr} reads no celery_adaptive metric"
        assert used <= names, f"{title}: not exported: {used - names}"
        assert _labels_used(expr) <= labels | {"le"}, f"{title}: {expr}"
    legends = " ".join(t.get("legendFormat", "") for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"])
    assert _labels_used(legends) <= labels


def test_rules_parse_and_read_only_exported_metrics():
    names, labels = _exported()
    rules = yaml.safe_load(RULES.read_text())
    assert set(rules) == {"groups"}
    [group] = rules["groups"]
    assert group["name"] == "celery-adaptive" and len(group["rules"]) >= 5
    alerts = {rule["alert"] for rule in group["rules"]}
    assert len(alerts) == len(group["rules"])
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        used = set(METRIC.findall(rule["expr"]))
        assert used and used <= names, f"{rule['alert']}: not exported: {used - names}"
        assert _labels_used(rule["expr"] + rule["annotations"]["summary"]) <= labels | {"le"}, rule["alert"]


def _promtool() -> str:
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed (the checks above are what CI relies on)")
    return promtool


def test_promtool_accepts_the_rules_and_every_dashboard_query(tmp_path):
    promtool = _promtool()
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Each dashboard query as a recording rule, Grafana's variables filled in: promtool parses it.
    records = [{"record": f"dashboard:query_{i}:check", "expr": expr.replace("$__rate_interval", "5m").replace("$hostname", ".*")}
               for i, (_, expr) in enumerate(_dashboard_queries()) if not expr.startswith("label_values")]
    queries = tmp_path / "dashboard-queries.yml"
    queries.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    checked = subprocess.run([promtool, "check", "rules", str(queries)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
