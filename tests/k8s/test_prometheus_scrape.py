"""A real Prometheus server scrapes live /metrics endpoints and answers PromQL over them.

The `start_prometheus` fixture (tests/k8s/conftest.py) is the harness: give it job -> targets
and it returns a ready server on a loopback port with a 1 s scrape interval. Here it scrapes a
prometheus_client endpoint in this process that exports the kit's latency histogram; pointed at
the ranker, retrieval and gateway metrics ports it checks the running services the same way.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from recsys.rpc.metrics import LATENCY_BUCKETS
from tests.k8s.k8s_utils import DASHBOARD_FILE, PrometheusServer, StartPrometheus, rule_groups

pytestmark = pytest.mark.integration

# Every fake request takes 18 ms: inside the kit's (0.015, 0.02] latency bucket.
OBSERVED_S = 0.018
BUCKET = (0.015, 0.02)
assert BUCKET[0] in LATENCY_BUCKETS and BUCKET[1] in LATENCY_BUCKETS


@pytest.fixture(scope="module")
def metrics_endpoint() -> Iterator[str]:
    """A /metrics endpoint on loopback whose latency histogram keeps receiving observations."""
    registry = CollectorRegistry()
    duration = Histogram(
        "recsys_grpc_request_duration_seconds",
        "gRPC request duration",
        ["grpc_service", "grpc_method"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    requests = Counter(
        "recsys_grpc_requests_total",
        "gRPC requests",
        ["grpc_service", "grpc_method", "grpc_code"],
        registry=registry,
    )
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            duration.labels("recsys.v1.RankingService", "Rank").observe(OBSERVED_S)
            requests.labels("recsys.v1.RankingService", "Rank", "OK").inc()
            stop.wait(0.01)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        stop.set()
        worker.join(timeout=5)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def prom(
    start_prometheus: StartPrometheus,
    metrics_endpoint: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> PrometheusServer:
    """One server for the module, scraping the endpoint as job "ranker", with the alert rules.

    The rules are the PrometheusRule's groups with every group evaluated each second (in the
    cluster the recording group runs every 30 s) so that the test sees a result quickly.
    """
    doc = rule_groups()
    for group in doc["groups"]:
        group["interval"] = "1s"
    rules = tmp_path_factory.mktemp("rules") / "recsys-alerts.rules.yaml"
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    server = start_prometheus({"ranker": [metrics_endpoint]}, rule_files=[rules])
    server.wait_for_samples('up{job="ranker"} == 1')
    return server


def test_prometheus_scrapes_and_computes_p99(prom: PrometheusServer, metrics_endpoint: str) -> None:
    (up,) = prom.query('up{job="ranker"}')
    assert up["metric"]["instance"] == metrics_endpoint
    assert up["value"][1] == "1"

    expr = (
        "histogram_quantile(0.99, "
        "sum(rate(recsys_grpc_request_duration_seconds_bucket[1m])) by (le))"
    )
    (sample,) = prom.wait_for_samples(expr)
    p99 = float(sample["value"][1])
    assert math.isfinite(p99)
    # Linear interpolation inside the bucket that holds every observation.
    assert BUCKET[0] < p99 <= BUCKET[1], p99


def test_alert_rules_load_and_record(prom: PrometheusServer) -> None:
    """The alert rules load into a real server and the p99 recording rule sees the same data."""
    groups = prom.api("rules")["groups"]
    assert {g["name"] for g in groups} == {"recsys.rules", "recsys.alerts"}
    assert all(r["health"] != "err" for g in groups for r in g["rules"]), groups
    (recorded,) = prom.wait_for_samples(
        'job:recsys_grpc_request_duration_seconds:p99_5m{job="ranker"}'
    )
    assert BUCKET[0] < float(recorded["value"][1]) <= BUCKET[1]
    # Healthy traffic (all OK, 18 ms) fires neither the latency nor the error-ratio alert.
    alerts = prom.api("alerts")["alerts"]
    firing = {a["labels"]["alertname"] for a in alerts if a["state"] != "inactive"}
    assert not firing & {"RecsysHighP99Latency", "RecsysHighErrorRatio"}, firing


def test_dashboard_queries_run(prom: PrometheusServer) -> None:
    """Every dashboard query parses and runs; the latency panel shows the scraped data."""
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    latency_panel_has_data = False
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            # Grafana's variables: no namespace label outside Kubernetes; a 1 minute window.
            expr = target["expr"].replace("$namespace", "").replace("$__rate_interval", "1m")
            result = prom.query(expr)  # raises on a PromQL error
            if "p99" in target["legendFormat"] and "recsys_grpc_request_duration" in expr:
                result = prom.wait_for_samples(expr)
                latency_panel_has_data = result[0]["metric"] == {"job": "ranker"}
    assert latency_panel_has_data
