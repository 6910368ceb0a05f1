"""Prometheus metrics shared by every service, defined once, served on a separate port."""

from __future__ import annotations

import logging
import threading
from importlib import metadata as importlib_metadata
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)

logger = logging.getLogger(__name__)

# No `<name>_created` series beside every counter and histogram: Prometheus does not use them
# and they double the series count. Every service imports this module.
disable_created_metrics()

# Latency buckets in seconds, dense between 1 ms and 100 ms where these services live.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

GRPC_REQUESTS = Counter(
    "recsys_grpc_requests",
    "gRPC calls handled, by service, method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_LATENCY = Histogram(
    "recsys_grpc_request_duration_seconds",
    "Time from receiving a gRPC call to sending its status, in seconds.",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge(
    "recsys_grpc_in_flight",
    "gRPC calls being handled now.",
    ["grpc_service", "grpc_method"],
)
BUILD_INFO = Info("recsys_build", "Version of the running code.")


def package_version() -> str:
    """The installed recsys-transfer version ("0+unknown" when run from a tree not installed)."""
    try:
        return importlib_metadata.version("recsys-transfer")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def start_metrics_server(
    port: int,
    host: str = "0.0.0.0",
    registry: CollectorRegistry = REGISTRY,
    *,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    client_cafile: Path | None = None,
) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on its own port, over HTTP, or HTTPS with `certfile` and `keyfile` (and
    client certificates signed by `client_cafile` required when given); port 0 picks a free one
    (see server_port)."""
    server, thread = start_http_server(
        port,
        addr=host,
        registry=registry,
        certfile=str(certfile) if certfile else None,
        keyfile=str(keyfile) if keyfile else None,
        client_cafile=str(client_cafile) if client_cafile else None,
        client_auth_required=client_cafile is not None,
    )
    logger.info("Serving metrics on %s:%d", host, server.server_port)
    return server, thread
