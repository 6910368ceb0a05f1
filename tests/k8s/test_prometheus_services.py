"""A real Prometheus server scrapes the running services: retrieval, two rankers and the gateway
as processes on loopback under load. Every target is up, latency quantiles aggregate across the
ranker replicas, and the services' own metrics are there."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from devtools.stack import LoadGenerator, Stack, StackOptions
from devtools.tiny_models import make_tiny_model, publish_tiny_model
from tests.k8s.k8s_utils import PrometheusServer, StartPrometheus

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    repo = tmp_path_factory.mktemp("repo")
    publish_tiny_model(repo, make_tiny_model(n_items=300))
    s = Stack(repo, tmp_path_factory.mktemp("logs"), StackOptions(ranker_slots=2))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def prom(stack: Stack, start_prometheus: StartPrometheus) -> Iterator[PrometheusServer]:
    targets = {
        "ranker": [f"127.0.0.1:{p.metrics_port}" for p in stack.rankers.values()],
        "retrieval": [f"127.0.0.1:{stack.retrieval.metrics_port}"],
        "gateway": [f"127.0.0.1:{stack.gateway.metrics_port}"],
    }
    with LoadGenerator(stack.gateway.address, concurrency=2) as load:
        server = start_prometheus(targets)
        server.wait_for_samples("count(up == 1) == 4")
        server.wait_for_samples(
            'sum(rate(recsys_grpc_requests_total{job="gateway",grpc_code="OK"}[1m])) > 0'
        )
        yield server
    assert not load.failures(), load.failures()[:3]


def test_every_service_is_up(prom: PrometheusServer) -> None:
    up = {(s["metric"]["job"], s["metric"]["instance"]): s["value"][1] for s in prom.query("up")}
    assert sorted(job for job, _ in up) == ["gateway", "ranker", "ranker", "retrieval"]
    assert set(up.values()) == {"1"}


@pytest.mark.parametrize(
    ("job", "service"),
    [
        ("gateway", "recsys.v1.RecommendationService"),
        ("ranker", "recsys.v1.RankingService"),
        ("retrieval", "recsys.v1.RetrievalService"),
    ],
)
def test_p99_latency_from_the_histograms(prom: PrometheusServer, job: str, service: str) -> None:
    # Summed over every replica of the job before the quantile: what summaries cannot do.
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(recsys_grpc_request_duration_seconds_bucket"
        f'{{job="{job}",grpc_service="{service}"}}[1m])))'
    )
    (sample,) = prom.wait_for_samples(expr)
    p99 = float(sample["value"][1])
    assert math.isfinite(p99) and 0 < p99 < 10, p99


def test_both_rankers_take_traffic(prom: PrometheusServer) -> None:
    # Candidates scored per replica: the gateway spreads shards over both.
    expr = 'sum by (instance) (increase(recsys_ranker_batch_candidates_sum{job="ranker"}[1m])) > 0'
    prom.wait_for_samples(f"count({expr}) == 2")
    assert len(prom.query(expr)) == 2


def test_service_metrics_are_exported(prom: PrometheusServer) -> None:
    for expr in (
        'recsys_ranker_model_loaded{model="books-ranker"} == 1',
        "recsys_retrieval_model_loaded == 1",
        "recsys_gateway_upstream_duration_seconds_count > 0",
    ):
        assert prom.wait_for_samples(expr), expr
