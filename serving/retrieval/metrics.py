"""Prometheus metrics of the retrieval service, defined once."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from recsys.rpc.metrics import LATENCY_BUCKETS

REQUESTS = Counter(
    "recsys_retrieval_requests",
    "Retrieve calls answered, by domain and by candidate source that contributed candidates.",
    ["domain", "source"],
)
SEARCH_DURATION = Histogram(
    "recsys_retrieval_search_duration_seconds",
    "Time to compute one Retrieve answer (search, exclusions, popular fill), in seconds.",
    ["domain"],
    buckets=LATENCY_BUCKETS,
)
MODEL_LOADED = Gauge(
    "recsys_retrieval_model_loaded",
    "1 while this version of the retrieval model is served; the series goes when it is unloaded.",
    ["model", "version", "index"],
)
MODEL_PUBLISHED = Gauge(
    "recsys_retrieval_model_published_timestamp_seconds",
    "When training made each served retrieval version (Unix seconds; age = time() - this).",
    ["model", "version"],
)
MODEL_LOAD_FAILURES = Counter(
    "recsys_retrieval_model_load_failures",
    "Versions of a retrieval model that failed verification or loading.",
    ["model"],
)
