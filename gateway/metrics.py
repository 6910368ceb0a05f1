"""Prometheus metrics of the gateway, defined once."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from recsys.rpc.metrics import LATENCY_BUCKETS

DEGRADED = Counter(
    "recsys_gateway_degraded",
    "Recommend answers degraded, by reason (ranking_unavailable, ranking_deadline, "
    "ranking_partial, retrieval_unavailable, unknown_user, ranking_invalid_scores).",
    ["reason"],
)
UPSTREAM_DURATION = Histogram(
    "recsys_gateway_upstream_duration_seconds",
    "Duration of calls to upstream services as the gateway sees them, in seconds.",
    ["upstream", "method"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "recsys_gateway_upstream_errors",
    "Failed calls to upstream services, by status code.",
    ["upstream", "code"],
)
STAGE_DURATION = Histogram(
    "recsys_gateway_stage_duration_seconds",
    "Time spent per stage of Recommend (retrieval, ranking, merge, response, total), in seconds.",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
