"""The alert rules: `promtool check rules` and `promtool test rules` on the PrometheusRule's
groups, and the metric names the rules and the dashboard use."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.k8s.k8s_utils import (
    ALERTS_TEST_FILE,
    DASHBOARD_FILE,
    RULES_FILE,
    rule_groups,
    write_rule_file,
)

REQUIRED_ALERTS = {
    "RecsysHighP99Latency",
    "RecsysHighErrorRatio",
    "RecsysDegradedAnswers",
    "RecsysNoReadyRanker",
    "RecsysModelLoadFailures",
}
# The metric families the services export (docs/metrics.md); histograms add _bucket/_sum/_count.
KNOWN_METRICS = {
    "recsys_grpc_requests_total",
    "recsys_grpc_request_duration_seconds",
    "recsys_grpc_in_flight",
    "recsys_build_info",
    "recsys_ranker_requests_total",
    "recsys_ranker_queue_duration_seconds",
    "recsys_ranker_compute_duration_seconds",
    "recsys_ranker_request_duration_seconds",
    "recsys_ranker_batch_requests",
    "recsys_ranker_batch_candidates",
    "recsys_ranker_queue_depth",
    "recsys_ranker_model_loaded",
    "recsys_ranker_model_published_timestamp_seconds",
    "recsys_ranker_model_load_failures_total",
    "recsys_ranker_dropped_total",
    "recsys_retrieval_requests_total",
    "recsys_retrieval_search_duration_seconds",
    "recsys_retrieval_model_loaded",
    "recsys_retrieval_model_published_timestamp_seconds",
    "recsys_retrieval_model_load_failures_total",
    "recsys_gateway_degraded_total",
    "recsys_gateway_upstream_duration_seconds",
    "recsys_gateway_upstream_errors_total",
    "recsys_gateway_stage_duration_seconds",
}
# Metric names, not recording rules (level:metric:operations, e.g. job:recsys_...:rate5m).
METRIC_REF = re.compile(r"(?<![:\w])(recsys_[a-z0-9_]+)(?![\w:])")


def _family(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """The extracted rule file next to a copy of the promtool unit tests."""
    write_rule_file(tmp_path / "recsys-alerts.rules.yaml")
    shutil.copy(ALERTS_TEST_FILE, tmp_path / ALERTS_TEST_FILE.name)
    return tmp_path


def test_promtool_check_rules(promtool: str, rules_dir: Path) -> None:
    proc = _run([promtool, "check", "rules", "recsys-alerts.rules.yaml"], rules_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_pass(promtool: str, rules_dir: Path) -> None:
    proc = _run([promtool, "test", "rules", ALERTS_TEST_FILE.name], rules_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_catch_a_wrong_threshold(promtool: str, rules_dir: Path) -> None:
    """The unit tests pin the thresholds: loosened latency and error limits make them fail."""
    rules = rules_dir / "recsys-alerts.rules.yaml"
    text = rules.read_text()
    loosened = text.replace("> 0.25", "> 0.6").replace("> 0.01", "> 0.1")
    assert loosened != text
    rules.write_text(loosened)
    proc = _run([promtool, "test", "rules", ALERTS_TEST_FILE.name], rules_dir)
    assert proc.returncode != 0
    assert "RecsysHighP99Latency" in proc.stdout + proc.stderr
    assert "RecsysHighErrorRatio" in proc.stdout + proc.stderr


def test_unit_tests_cover_the_latency_and_error_alerts_both_ways() -> None:
    doc = yaml.safe_load(ALERTS_TEST_FILE.read_text())
    outcomes: dict[str, set[bool]] = {}
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            outcomes.setdefault(check["alertname"], set()).add(bool(check["exp_alerts"]))
    for alert in ("RecsysHighP99Latency", "RecsysHighErrorRatio"):
        assert outcomes.get(alert) == {True, False}, f"{alert}: {outcomes.get(alert)}"
    assert set(outcomes) == REQUIRED_ALERTS


def test_required_alerts_exist_and_use_known_metrics() -> None:
    groups = rule_groups(RULES_FILE)["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    assert set(alerts) == REQUIRED_ALERTS
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"]
    exprs = [r["expr"] for g in groups for r in g["rules"]]
    used = {_family(m) for e in exprs for m in METRIC_REF.findall(e)}
    assert used <= KNOWN_METRICS, used - KNOWN_METRICS


def test_dashboard_uses_known_metrics() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    used = {_family(m) for e in exprs for m in METRIC_REF.findall(e)}
    assert used <= KNOWN_METRICS, used - KNOWN_METRICS
    assert "recsys_grpc_request_duration_seconds" in used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
