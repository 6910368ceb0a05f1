"""Prometheus metrics of the ranking service, defined once (reference: docs/metrics.md)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from recsys.rpc.metrics import LATENCY_BUCKETS

BATCH_REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
BATCH_CANDIDATE_BUCKETS = (
    1,
    10,
    100,
    500,
    1000,
    2000,
    4000,
    8000,
    16384,
    32768,
    65536,
    131072,
)

REQUESTS = Counter(
    "recsys_ranker_requests",
    "Scoring requests by model, version, API (rank or oip) and status code.",
    ["model", "version", "api", "status"],
)
QUEUE_DURATION = Histogram(
    "recsys_ranker_queue_duration_seconds",
    "Time a request waited in the batching queue before its session run started, in seconds.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE_DURATION = Histogram(
    "recsys_ranker_compute_duration_seconds",
    "Duration of one ONNX Runtime session run (one batch), in seconds.",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
REQUEST_DURATION = Histogram(
    "recsys_ranker_request_duration_seconds",
    "Time from receiving a scoring request to having its scores, in seconds.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
SOLO_RUNS = Counter(
    "recsys_ranker_solo_runs",
    "Session runs on a version's solo session (one request alone in the server; "
    "RANKING_SOLO_INTRA_OP_THREADS).",
    ["model"],
)
BATCH_REQUESTS = Histogram(
    "recsys_ranker_batch_requests",
    "Requests scored together in one session run.",
    ["model"],
    buckets=BATCH_REQUEST_BUCKETS,
)
BATCH_CANDIDATES = Histogram(
    "recsys_ranker_batch_candidates",
    "Candidates scored together in one session run.",
    ["model"],
    buckets=BATCH_CANDIDATE_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "recsys_ranker_queue_depth",
    "Requests waiting in the batching queues of a model.",
    ["model"],
)
MODEL_LOADED = Gauge(
    "recsys_ranker_model_loaded",
    "1 for each model version loaded and serving, with its execution provider.",
    ["model", "version", "provider"],
)
MODEL_PUBLISHED = Gauge(
    "recsys_ranker_model_published_timestamp_seconds",
    "When training made each loaded model version (Unix seconds; model age = time() - this).",
    ["model", "version"],
)
LOAD_FAILURES = Counter(
    "recsys_ranker_model_load_failures",
    "Model versions that failed to load (corrupt files, wrong signature, bad vocabulary).",
    ["model"],
)
DROPPED = Counter(
    "recsys_ranker_dropped",
    "Requests dropped before compute, by reason (expired, cancelled, queue_full).",
    ["model", "reason"],
)
