"""Server lifecycle: a grpc.aio server with health, reflection, interceptors, limits, TLS and
metrics, and graceful shutdown on SIGTERM and SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
import numpy  # noqa: F401  (loads numpy's BLAS before the limit below is set)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from threadpoolctl import threadpool_limits

from recsys.rpc import metrics
from recsys.rpc.interceptors import CachingInterceptor, Handler, default_interceptors
from recsys.rpc.settings import ServerSettings, refuse
from recsys.rpc.tls import ClientCertificateInterceptor, server_credentials

logger = logging.getLogger(__name__)

Registrar = Callable[[grpc.aio.Server], None]

# The drain ends once no unary call has been in flight for this long: calls that the transport
# had already received when the drain began get time to be dispatched and counted.
DRAIN_QUIET_S = 0.25
DRAIN_POLL_S = 0.02


class _InFlight(CachingInterceptor):
    """Counts the unary calls being handled, for the drain, and those cancelled at its end.
    Streams (health Watch) stay open for good and are not counted or waited for."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.stopping = False  # the server is stopping: a cancelled call is one the drain lost
        self.cancelled = 0

    def wrap(self, method: str, inner: Handler) -> Handler:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.count += 1
            try:
                return await inner(request, context)
            except asyncio.CancelledError:
                if self.stopping:
                    self.cancelled += 1
                raise
            finally:
                self.count -= 1

        return counted


class RpcServer:
    """One service's gRPC server and metrics endpoint.

    Health starts NOT_SERVING for the whole server ("") and for every service name; the owner
    calls `set_serving(True)` once its models are loaded and warm. `stop()` turns health to
    NOT_SERVING, waits `shutdown_delay_s` so that load balancers notice, then stops accepting calls
    and lets calls in flight finish within the grace period.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        service_names: Iterable[str],
        register: Registrar,
        interceptors: list[grpc.aio.ServerInterceptor] | None = None,
    ) -> None:
        self.settings = settings
        self.service_names = list(service_names)
        if settings.blas_threads:
            # Process-wide, for every thread, over the BLAS libraries loaded by now: numpy's
            # (imported above) and FAISS's where the service imported it.
            threadpool_limits(limits=settings.blas_threads, user_api="blas")
        self.port = 0
        self.metrics_port = 0
        self.serving = False  # what health says: SERVING between start-up and shutdown
        self.draining = False  # stop() was called: health stays NOT_SERVING
        self._metrics_httpd: object | None = None
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        options = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ]
        self._in_flight = _InFlight()
        chain = default_interceptors() if interceptors is None else list(interceptors)
        if settings.tls_client_ca_file is not None and settings.tls_client_require_eku:
            # Outermost after the in-flight count: a client whose certificate may not
            # authenticate clients gets nowhere.
            chain.insert(0, ClientCertificateInterceptor())
        self.server = grpc.aio.server(interceptors=[self._in_flight, *chain], options=options)
        register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        if settings.reflection:
            reflection.enable_server_reflection(
                [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
            )

    async def start(self) -> None:
        """Bind the ports and start serving (health NOT_SERVING until set_serving(True), unless
        that was called before)."""
        await self._set_health(
            health_pb2.HealthCheckResponse.SERVING
            if self.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        settings = self.settings
        address = f"{settings.host}:{settings.port}"
        credentials = server_credentials(settings)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            self.port = 0
            logger.debug("Binding %s failed: %s", address, exc)
        if self.port == 0:
            refuse(
                f"invalid settings for {type(settings).__name__}: host and port ({address}): "
                "cannot serve gRPC there (address in use or not local"
                + (", or tls_cert_file/tls_key_file unusable)" if credentials else ")")
            )
        await self.server.start()
        metrics.BUILD_INFO.info({"version": metrics.package_version()})
        metrics_host = settings.metrics_host or settings.host
        tls = settings.metrics_tls
        try:
            httpd, _ = metrics.start_metrics_server(
                settings.metrics_port,
                metrics_host,
                certfile=settings.tls_cert_file if tls else None,
                keyfile=settings.tls_key_file if tls else None,
                client_cafile=settings.tls_client_ca_file if tls else None,
            )
        except OSError as exc:
            await self.server.stop(0)
            refuse(
                f"invalid settings for {type(settings).__name__}: metrics_host and metrics_port "
                f"({metrics_host}:{settings.metrics_port}): cannot serve metrics there ({exc})"
            )
        self._metrics_httpd = httpd
        self.metrics_port = httpd.server_port
        logger.info(
            "Serving %s on %s:%d (%s), metrics on %s:%d (%s)",
            ", ".join(self.service_names),
            settings.host,
            self.port,
            "TLS" if credentials else "plaintext",
            metrics_host,
            self.metrics_port,
            "HTTPS" if tls else "HTTP",
        )

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ["", *self.service_names]:
            await self._health.set(name, status)

    async def set_serving(self, serving: bool) -> None:
        """Health SERVING or NOT_SERVING; once draining, always NOT_SERVING."""
        serving = serving and not self.draining
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._set_health(status)
        self.serving = serving
        logger.info("Health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))

    @property
    def in_flight(self) -> int:
        """Unary calls being handled now."""
        return self._in_flight.count

    async def stop(self, grace: float | None = None) -> None:
        """Drain within `grace` seconds (default grace_period_s, counted from now): NOT_SERVING;
        `shutdown_delay_s` more of normal serving; then keep accepting while calls are in flight,
        until none has been for DRAIN_QUIET_S (calls the transport already holds are served, not
        cancelled); then refuse new calls and give those in flight what is left of the grace
        period. Only calls still running when it is over are cancelled, and the log counts them."""
        loop = asyncio.get_running_loop()
        grace = self.settings.grace_period_s if grace is None else grace
        deadline = loop.time() + grace
        self.draining = True
        await self.set_serving(False)
        if self.settings.shutdown_delay_s > 0:
            await asyncio.sleep(min(self.settings.shutdown_delay_s, grace))
        logger.info("Draining: %d calls in flight, up to %.1f s", self.in_flight, grace)
        quiet_since: float | None = None
        while (now := loop.time()) < deadline:
            if self.in_flight:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= DRAIN_QUIET_S:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        remaining = max(0.0, deadline - loop.time())
        logger.info(
            "Stopping: new calls refused; %d calls in flight get up to %.1f s",
            self.in_flight,
            remaining,
        )
        self._in_flight.stopping = True
        await self.server.stop(remaining)
        # The handlers of the calls cancelled at the end of the grace period end soon after.
        settle = loop.time() + 1.0
        while self.in_flight and loop.time() < settle:
            await asyncio.sleep(DRAIN_POLL_S)
        cancelled = self._in_flight.cancelled + self.in_flight
        if cancelled:
            logger.warning("Grace period of %.1f s over: %d calls cancelled", grace, cancelled)
        else:
            logger.info("Drained: no call in flight was cancelled")
        httpd = self._metrics_httpd
        if httpd is not None:
            httpd.shutdown()  # type: ignore[attr-defined]
            httpd.server_close()  # type: ignore[attr-defined]
            self._metrics_httpd = None
        logger.info("Stopped")


async def serve_until_signal(
    server: RpcServer,
    *,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    owner_sets_health: bool = False,
) -> None:
    """Start, run `on_startup` (load and warm models), go SERVING (unless `owner_sets_health`:
    then the owner calls set_serving as it sees fit), and on SIGTERM or SIGINT drain and return
    (the process then exits 0). An exception from `on_startup` stops the server and propagates."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    startup = asyncio.ensure_future(on_startup()) if on_startup else None
    try:
        if startup is not None:
            done, _ = await asyncio.wait(
                {startup, asyncio.ensure_future(stop.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if startup in done:
                startup.result()
                if not owner_sets_health:
                    await server.set_serving(True)
            else:
                startup.cancel()
        elif not owner_sets_health:
            await server.set_serving(True)
        await stop.wait()
        logger.info("Shutdown signal received")
    finally:
        await server.stop()
        if on_shutdown is not None:
            await on_shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
