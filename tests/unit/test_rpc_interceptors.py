"""The server interceptors wrap a method's handler once and reuse the wrapper call after call
(grpc.aio runs the chain per call), re-wrapping only when the method resolves to another handler;
every call is still counted with its own status."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from prometheus_client import REGISTRY

from recsys.rpc.interceptors import ExceptionToStatusInterceptor, MetricsInterceptor

METHOD = "/test.Interceptors/Echo"


class _Details:
    method = METHOD
    invocation_metadata = ()


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def code(self) -> grpc.StatusCode | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def _handler(reply: str) -> grpc.RpcMethodHandler:
    async def echo(request: Any, context: Any) -> str:
        if request == "fail":
            raise ValueError("boom")
        return f"{reply}:{request}"

    return grpc.unary_unary_rpc_method_handler(echo)


def _count(status: str) -> float:
    labels = {"grpc_service": "test.Interceptors", "grpc_method": "Echo", "grpc_code": status}
    return REGISTRY.get_sample_value("recsys_grpc_requests_total", labels) or 0.0


def test_a_method_is_wrapped_once_and_every_call_is_still_counted() -> None:
    metrics, errors = MetricsInterceptor(), ExceptionToStatusInterceptor()
    current = {"handler": _handler("a")}

    async def innermost(details: Any) -> grpc.RpcMethodHandler:
        return current["handler"]

    async def chain() -> grpc.RpcMethodHandler:
        async def inner(details: Any) -> grpc.RpcMethodHandler:
            return await errors.intercept_service(innermost, details)

        return await metrics.intercept_service(inner, _Details())

    async def scenario() -> None:
        first, second = await chain(), await chain()
        assert first is second  # the same wrapper for the same handler
        ok_before, unknown_before = _count("OK"), _count("UNKNOWN")
        assert await first.unary_unary("x", _Context()) == "a:x"
        assert await second.unary_unary("y", _Context()) == "a:y"
        assert _count("OK") == ok_before + 2
        context = _Context()
        try:
            await first.unary_unary("fail", context)
        except grpc.aio.AbortError:
            pass
        assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.INTERNAL
        assert _count("UNKNOWN") == unknown_before + 1
        current["handler"] = _handler("b")  # the method now resolves elsewhere: wrapped anew
        third = await chain()
        assert third is not first
        assert await third.unary_unary("z", _Context()) == "b:z"

    asyncio.run(scenario())
