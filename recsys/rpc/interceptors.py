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
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


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


class CachingInterceptor(grpc.aio.ServerInterceptor):
    """A unary-call interceptor that wraps each method's handler once, not once per call.

    grpc.aio runs the interceptor chain for every call; the handler a method resolves to is the
    same object call after call (the registered one, or the same cached wrapper of an inner
    interceptor), so the wrapper built for it is kept and reused while that stays true. Streams
    pass through unwrapped. Subclasses implement `wrap(method, inner)`."""

    def __init__(self) -> None:
        # method -> (the inner handler, its wrapper)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, method: str, inner: Handler) -> Handler:
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap_unary(handler, lambda inner: self.wrap(method, inner))
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class ExceptionToStatusInterceptor(CachingInterceptor):
    """Maps exceptions that escape a unary handler to a status code and message.

    Domain errors (recsys.rpc.errors) keep their message; anything else becomes INTERNAL with a
    generic message, and the traceback goes to the log, never to the client.
    """

    def wrap(self, method: str, inner: Handler) -> Handler:
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


class MetricsInterceptor(CachingInterceptor):
    """Counts unary calls by service, method and status code, and times them (histogram)."""

    def wrap(self, full_method: str, inner: Handler) -> Handler:
        service, method = _split_method(full_method)
        latency = metrics.GRPC_LATENCY.labels(service, method)
        in_flight = metrics.GRPC_IN_FLIGHT.labels(service, method)
        counters: dict[str, Any] = {}  # status -> the counter child (label lookups cost more)

        def count(status: str) -> None:
            counter = counters.get(status)
            if counter is None:
                counter = counters[status] = metrics.GRPC_REQUESTS.labels(service, method, status)
            counter.inc()

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
                count(code.name if isinstance(code, grpc.StatusCode) else str(code))

        return measured


def default_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Metrics outermost, so they see the status the exception interceptor chose."""
    return [MetricsInterceptor(), ExceptionToStatusInterceptor()]
