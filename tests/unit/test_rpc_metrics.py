"""The metrics interceptor records every call by service, method and status code."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client import REGISTRY

from recsys.inference import grpc_service_pb2 as pb
from recsys.inference import grpc_service_pb2_grpc as pb_grpc
from recsys.rpc.settings import ServerSettings
from tests.utils.kit_server import SERVICE_NAME, build_server
from tests.utils.servers import BackgroundServer

pytestmark = pytest.mark.integration


def _count(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "recsys_grpc_requests_total",
        {"grpc_service": SERVICE_NAME, "grpc_method": method, "grpc_code": code},
    )
    return value or 0.0


def _latency_count(method: str) -> float:
    value = REGISTRY.get_sample_value(
        "recsys_grpc_request_duration_seconds_count",
        {"grpc_service": SERVICE_NAME, "grpc_method": method},
    )
    return value or 0.0


def test_calls_are_counted_and_timed_per_status() -> None:
    async def factory():
        return build_server(ServerSettings(host="127.0.0.1", port=0, metrics_port=0))[0]

    server = BackgroundServer(factory)
    try:
        before_ok = _count("ModelInfer", "OK")
        before_nf = _count("ModelInfer", "NOT_FOUND")
        before_live = _count("ServerLive", "OK")
        before_latency = _latency_count("ModelInfer")
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(3):
                stub.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=5)
            request = pb.ModelInferRequest(model_name="m")
            request.parameters["raise"].string_param = "NotFound"
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(request, timeout=5)
            stub.ServerLive(pb.ServerLiveRequest(), timeout=5)
        assert _count("ModelInfer", "OK") - before_ok == 3
        assert _count("ModelInfer", "NOT_FOUND") - before_nf == 1
        assert _count("ServerLive", "OK") - before_live == 1
        assert _latency_count("ModelInfer") - before_latency == 4
        # Served over HTTP on the separate metrics port, as cumulative histogram buckets.
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        assert "recsys_grpc_request_duration_seconds_bucket{" in body
        assert 'le="+Inf"' in body
        assert 'grpc_code="NOT_FOUND"' in body
    finally:
        server.stop()
