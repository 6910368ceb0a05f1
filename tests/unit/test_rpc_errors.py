"""Every row of the exception -> status code table, through the real interceptor."""

from __future__ import annotations

import grpc
import pytest

from recsys.inference import grpc_service_pb2 as pb
from recsys.inference import grpc_service_pb2_grpc as pb_grpc
from recsys.rpc import errors
from recsys.rpc.settings import ServerSettings
from tests.utils.kit_server import build_server
from tests.utils.servers import BackgroundServer

TABLE = [
    ("InvalidRequest", grpc.StatusCode.INVALID_ARGUMENT),
    ("NotFound", grpc.StatusCode.NOT_FOUND),
    ("FailedPrecondition", grpc.StatusCode.FAILED_PRECONDITION),
    ("ResourceExhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("Unavailable", grpc.StatusCode.UNAVAILABLE),
    ("ModelNotReady", grpc.StatusCode.UNAVAILABLE),
    ("UpstreamUnavailable", grpc.StatusCode.UNAVAILABLE),
    ("DeadlineExceeded", grpc.StatusCode.DEADLINE_EXCEEDED),
]


@pytest.mark.parametrize(("name", "code"), TABLE)
def test_status_for_domain_errors(name: str, code: grpc.StatusCode) -> None:
    exc = getattr(errors, name)("the message")
    assert errors.status_for(exc) == (code, "the message")


def test_status_for_anything_else_is_internal_and_generic() -> None:
    assert errors.status_for(KeyError("user 42")) == (
        grpc.StatusCode.INTERNAL,
        errors.INTERNAL_ERROR_MESSAGE,
    )
    assert errors.status_for(TimeoutError())[0] == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.fixture(scope="module")
def kit_stub():
    async def factory():
        return build_server(ServerSettings(host="127.0.0.1", port=0, metrics_port=0))[0]

    server = BackgroundServer(factory)
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
    server.stop()


def _raise(stub, name: str) -> grpc.RpcError:
    request = pb.ModelInferRequest(model_name="m")
    request.parameters["raise"].string_param = name
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=5)
    return info.value


@pytest.mark.integration
@pytest.mark.parametrize(("name", "code"), TABLE)
def test_interceptor_maps_domain_errors(kit_stub, name: str, code: grpc.StatusCode) -> None:
    err = _raise(kit_stub, name)
    assert err.code() == code
    assert err.details() == f"raised {name}"


@pytest.mark.integration
def test_interceptor_hides_unexpected_errors(kit_stub, caplog) -> None:
    with caplog.at_level("ERROR"):
        err = _raise(kit_stub, "boom")
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "Internal server error"
    assert "secret detail" not in err.details()
    assert any("secret detail" in (r.exc_text or "") for r in caplog.records)


def test_shorten_escapes_and_cuts_client_values() -> None:
    assert errors.shorten("abc") == "'abc'"
    short = errors.shorten("\n\u00e9" + "x" * 20_000)
    assert short.startswith("'\\n\\xe9xx") and short.endswith("...' (20002 chars)")
    assert len(short) < 80
    assert errors.shorten("it's" * 20).endswith('..." (80 chars)')


def test_check_ids_bounds_count_length_and_empty_ids() -> None:
    errors.check_ids(["a", "bb"], "ids", 2, 2)
    for ids, needle in [(["a"] * 3, "has 3 ids"), (["a", ""], "empty"), (["abc"], "3 characters")]:
        with pytest.raises(errors.InvalidRequest, match=needle):
            errors.check_ids(ids, "ids", 2, 2)
