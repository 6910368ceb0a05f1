"""TLS for servers (optionally mutual) and channels for clients, plaintext or TLS."""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from recsys.rpc.settings import ServerSettings


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from settings, or None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    key = settings.tls_key_file.read_bytes()
    cert = settings.tls_cert_file.read_bytes()
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1024)
def client_certificate_problem(pem: bytes) -> str | None:
    """Why a client certificate (PEM) may not authenticate a client, or None if it may: its
    extended key usage must list clientAuth (or anyExtendedKeyUsage). The TLS handshake already
    refuses a certificate whose extended key usage leaves clientAuth out (a server certificate);
    this also refuses one without the extension, which RFC 5280 (4.2.1.12) would leave
    unrestricted: a certificate issued with no stated purpose does not authenticate clients."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        return f"unreadable client certificate ({exc})"
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "the client certificate has no extended key usage; clientAuth is required"
    if ExtendedKeyUsageOID.CLIENT_AUTH in usage or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in (
        usage
    ):
        return None
    return "the client certificate's extended key usage does not allow client authentication"


class ClientCertificateInterceptor(grpc.aio.ServerInterceptor):
    """Mutual TLS: refuses (UNAUTHENTICATED) every call, unary or streaming, whose client
    certificate does not allow client authentication (see client_certificate_problem). The TLS
    handshake already checked that it chains to the client CA."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        async def check(context: grpc.aio.ServicerContext) -> None:
            pems = list(context.auth_context().get("x509_pem_cert") or [])
            problem = client_certificate_problem(pems[0]) if pems else "no client certificate"
            if problem is not None:
                logger.warning("%s refused: %s (peer %s)", method, problem, context.peer())
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        def wrap(inner: Any) -> Any:
            if inspect.isasyncgenfunction(inner):

                async def streamed(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    await check(context)
                    async for item in inner(request, context):
                        yield item

                return streamed

            async def called(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(context)
                return await inner(request, context)

            return called

        kinds = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }
        for attribute, make in kinds.items():
            inner = getattr(handler, attribute)
            if inner is not None:
                return make(
                    wrap(inner),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


@dataclass(frozen=True)
class ClientTLS:
    """What a client needs to dial TLS: the CA that signed the server, and for mutual TLS its own
    certificate and key. `server_name` overrides the name checked against the certificate."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )


def channel_options(
    max_message_bytes: int, *, round_robin: bool = False, server_name: str | None = None
) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 1),
    ]
    if round_robin:
        # Balance calls over every address the target resolves to (a list of addresses, or a
        # DNS name with many records such as a headless Kubernetes Service), instead of pinning
        # one HTTP/2 connection to one backend. Client-side health checking takes a backend out
        # of the rotation as soon as its health turns NOT_SERVING (it is draining).
        service_config = {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": ""},
        }
        options.append(("grpc.service_config", json.dumps(service_config)))
        options.append(("grpc.dns_min_time_between_resolutions_ms", 1_000))
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def create_channel(
    target: str,
    *,
    max_message_bytes: int = 16 * 1024 * 1024,
    tls: ClientTLS | None = None,
    round_robin: bool = False,
) -> grpc.Channel:
    """A blocking channel to `target` (for tools, tests and benchmarks)."""
    options = channel_options(
        max_message_bytes, round_robin=round_robin, server_name=tls.server_name if tls else None
    )
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options)
