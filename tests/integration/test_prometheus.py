"""The operators' side checked with Prometheus' own promtool: the alert rules and the scrape configuration load, the
alerts fire on the series they are written for, every clinfer metric they and the dashboard query is one we
export, and our /metrics exposition passes promtool's lint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from service import metrics
from tests.conftest import REQUIRE_SERVICES, Tokens

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
QUERIERS = [ALERTS, *sorted((REPO / "deploy" / "grafana").rglob("*.json")), *sorted((REPO / "helm").rglob("*.yaml"))]


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        message = "promtool is not installed (make install installs Debian's prometheus with apt-get)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run([tool, *args], input=stdin, capture_output=True, text=True, timeout=60)


def _exported_series() -> set[str]:
    """The series names our collectors expose (a counter's ``_total``, a histogram's ``_bucket``/``_sum``/
    ``_count``...), whether or not a labelled one has a sample yet."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in [*REGISTRY.collect(), *metrics.GpuCollector(_NoGpu()).collect()]:
        if family.name.startswith("clinfer_"):
            names.add(family.name)  # as a description names it
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


class _NoGpu:
    """An NVML binding whose every call fails, as on a GPU fallen off the bus: the GPU families, without samples."""

    NVMLError = RuntimeError

    def __getattr__(self, name: str) -> Any:
        def fails(*args: Any) -> Any:
            raise RuntimeError(name)

        return fails


def _rendered(annotations: dict[str, str], labels: dict[str, str], value: str) -> dict[str, str]:
    """An alert's annotations as Prometheus renders them, for the ``$labels.X`` and ``$value`` they use."""

    def render(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        return text.replace("{{ $value }}", value)

    return {key: render(text) for key, text in annotations.items()}


def test_the_alert_rules_load() -> None:
    checked = _promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_scrape_configuration_loads(tmp_path: Path) -> None:
    """As the compose stack mounts it: the token file and the rules beside it."""
    token = tmp_path / "clinfer-token"
    token.write_text("a-token\n")
    config = SCRAPE_CONFIG.read_text().replace("/etc/prometheus/clinfer-token", str(token))
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    checked = _promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_clinfer_series_the_alerts_and_dashboards_query_is_exported() -> None:
    exported = _exported_series()
    queried: dict[str, set[str]] = {}
    for path in QUERIERS:
        for name in re.findall(r"\bclinfer_[a-z0-9_]*[a-z0-9]\b", path.read_text()):
            queried.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert "clinfer_jobs_total" in queried, "the files were read"
    unknown = {name: sorted(paths) for name, paths in queried.items() if name not in exported}
    assert unknown == {}, f"queried but not exported: {unknown}"


def test_the_dashboard_is_json_and_every_panel_has_a_query() -> None:
    for path in sorted((REPO / "deploy" / "grafana").rglob("*.json")):
        dashboard = json.loads(path.read_text())
        panels = [p for p in dashboard.get("panels", []) if p.get("type") != "row"]
        assert panels, path
        for panel in panels:
            assert [t.get("expr") for t in panel.get("targets", []) if t.get("expr")], (path.name, panel.get("title"))


def test_the_alerts_fire_on_what_they_are_written_for(tmp_path: Path) -> None:
    """promtool's rule unit tests, over series as our collectors name and label them."""
    rules = [rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    assert {
        "ClinferAuditFailing",
        "ClinferDicomSendersTurnedAway",
        "ClinferQueueDepthHigh",
        "ClinferResultDestinationUnreachable",
        "ClinferResultDeliveriesFailed",
    } <= set(rules)
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text())
    annotations = {
        rule["alert"]: rule.get("annotations", {})
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }

    def fired(alert: str, labels: dict[str, str], value: str = "") -> dict[str, Any]:
        return {"exp_labels": labels, "exp_annotations": _rendered(annotations[alert], labels, value)}

    audit = {"severity": "critical", "event_type": "dimse.association"}
    refused = {"severity": "warning", "reason": "too-many-connections"}
    queue = {"severity": "warning", "queue": "infer"}
    down_pacs = {"severity": "warning", "destination": "pacs"}
    failed_pacs = {"severity": "critical", "destination": "pacs"}
    unit_tests = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'clinfer_audit_failures_total{event_type="dimse.association"}', "values": "0 0 0 1x16"},
                    {"series": 'clinfer_dimse_refused_total{reason="too-many-connections"}', "values": "0 0 0 0 5x15"},
                    {"series": 'clinfer_queue_depth{queue="infer",instance="a"}', "values": "500x30"},
                    {"series": 'clinfer_queue_depth{queue="infer",instance="b"}', "values": "480x30"},
                    # "pacs" is down from minute 5 (every push retried) and refuses for good from minute 40;
                    # "archive" takes its pushes, with a retry now and then: neither alert is about it
                    {"series": 'clinfer_deliveries_total{destination="pacs",outcome="delivered"}', "values": "3x60"},
                    {"series": 'clinfer_deliveries_total{destination="pacs",outcome="retry"}', "values": "0x5 1+1x55"},
                    {"series": 'clinfer_deliveries_total{destination="pacs",outcome="failed"}', "values": "0x40 1x20"},
                    {
                        "series": 'clinfer_deliveries_total{destination="archive",outcome="delivered"}',
                        "values": "0+2x60",
                    },
                    {"series": 'clinfer_deliveries_total{destination="archive",outcome="retry"}', "values": "0+1x60"},
                ],
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "ClinferAuditFailing", "exp_alerts": []},
                    {
                        "eval_time": "5m",
                        "alertname": "ClinferAuditFailing",
                        "exp_alerts": [fired("ClinferAuditFailing", audit)],
                    },
                    {
                        "eval_time": "6m",
                        "alertname": "ClinferDicomSendersTurnedAway",
                        "exp_alerts": [fired("ClinferDicomSendersTurnedAway", refused)],
                    },
                    {"eval_time": "5m", "alertname": "ClinferQueueDepthHigh", "exp_alerts": []},
                    {"eval_time": "15m", "alertname": "ClinferResultDestinationUnreachable", "exp_alerts": []},
                    {
                        "eval_time": "25m",
                        "alertname": "ClinferResultDestinationUnreachable",
                        "exp_alerts": [fired("ClinferResultDestinationUnreachable", down_pacs)],
                    },
                    {"eval_time": "39m", "alertname": "ClinferResultDeliveriesFailed", "exp_alerts": []},
                    {
                        "eval_time": "41m",
                        "alertname": "ClinferResultDeliveriesFailed",
                        "exp_alerts": [fired("ClinferResultDeliveriesFailed", failed_pacs)],
                    },
                    {
                        "eval_time": "12m",
                        "alertname": "ClinferQueueDepthHigh",
                        "exp_alerts": [fired("ClinferQueueDepthHigh", queue, "500")],
                    },
                ],
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(unit_tests))
    tested = _promtool("test", "rules", str(tmp_path / "tests.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_our_metrics_exposition_passes_promtool_lint(client: TestClient, tokens: Tokens) -> None:
    response = client.get("/metrics", headers=tokens.header("admin"))
    assert response.status_code == 200
    assert "clinfer_http_requests_total" in response.text
    linted = _promtool("check", "metrics", stdin=response.text)
    assert linted.returncode == 0, linted.stdout + linted.stderr
