"""Server interceptors: domain exceptions to status codes, and Prometheus metrics per call."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from grpc.aio import AbortError

from recsys.rpc import metrics
from recsys.rpc.errors import RecsysError, status_for

logger = logging.getLogger(__name__)

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _split_method(full_method: str) -> tuple[str, str]:
    """'/recsys.v1.RankingService/Rank' -> ('recsys.v1.RankingService', 'Rank')."""
    _, _, rest = full_method.partition("/")
    service, _, method = rest.partition("/")
    return service or "unknown", method or "unknown"


def _wrap_unary(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Handler], Handler]
) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        wrap(cast(Handler, handler.unary_unary)),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ExceptionToStatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions that escape a unary handler to a status code and message.

    Domain errors (recsys.rpc.errors) keep their message; anything else becomes INTERNAL with a
    generic message, and the traceback goes to the log, never to the client.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method

        def wrap(inner: Handler) -> Handler:
            async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner(request, context)
                except (AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    code, message = status_for(exc)
                    if isinstance(exc, RecsysError):
                        logger.info("%s -> %s: %s", method, code.name, message)
                    elif code == grpc.StatusCode.INTERNAL:
                        logger.exception("%s failed", method)
                    else:
                        logger.warning("%s -> %s: %r", method, code.name, exc)
                    await context.abort(code, message)

            return guarded

        return _wrap_unary(handler, wrap)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts unary calls by service, method and status code, and times them (histogram)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        service, method = _split_method(handler_call_details.method)
        latency = metrics.GRPC_LATENCY.labels(service, method)
        in_flight = metrics.GRPC_IN_FLIGHT.labels(service, method)

        def wrap(inner: Handler) -> Handler:
            async def measured(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                in_flight.inc()
                code: grpc.StatusCode | None = None
                try:
                    response = await inner(request, context)
                    code = context.code() or grpc.StatusCode.OK
                    return response
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except Exception:
                    code = grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    in_flight.dec()
                    latency.observe(time.perf_counter() - start)
                    status = code.name if isinstance(code, grpc.StatusCode) else str(code)
                    metrics.GRPC_REQUESTS.labels(service, method, status).inc()

            return measured

        return _wrap_unary(handler, wrap)


def default_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Metrics outermost, so they see the status the exception interceptor chose."""
    return [MetricsInterceptor(), ExceptionToStatusInterceptor()]
