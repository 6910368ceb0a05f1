"""TLS for servers (optionally mutual) and channels for clients, plaintext or TLS."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

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


def create_aio_channel(
    target: str,
    *,
    max_message_bytes: int = 16 * 1024 * 1024,
    tls: ClientTLS | None = None,
    round_robin: bool = False,
) -> grpc.aio.Channel:
    """An asyncio channel to `target`, plaintext or TLS, with the kit's limits and keepalive."""
    options = channel_options(
        max_message_bytes, round_robin=round_robin, server_name=tls.server_name if tls else None
    )
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.credentials(), options=options)


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
