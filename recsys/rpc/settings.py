"""Typed service settings from environment variables and `--key=value` flags, validated at start."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import sys
from pathlib import Path
from typing import Literal, NoReturn, TypeVar

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

MIB = 1024 * 1024


class ServerSettings(BaseSettings):
    """Settings every gRPC service has. Subclasses set `env_prefix` (e.g. RANKING_)."""

    model_config = SettingsConfigDict(
        env_prefix="RECSYS_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_exit_on_error=False,
        extra="ignore",
    )

    host: str = Field("0.0.0.0", description="Address the gRPC and metrics servers bind to.")
    port: int = Field(8001, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int = Field(
        9001, ge=0, le=65535, description="Prometheus /metrics HTTP port (0 picks a free one)."
    )
    tls_client_require_eku: bool = Field(
        True,
        description="Mutual TLS: a client certificate must state extended key usage clientAuth "
        "(one without the extension is refused too); false accepts one without it.",
    )
    metrics_host: str | None = Field(
        None,
        description="Address the /metrics server binds to (e.g. 127.0.0.1 to keep it off the "
        "network); unset: the same as host.",
    )
    metrics_tls: bool = Field(
        False,
        description="Serve /metrics over HTTPS with tls_cert_file and tls_key_file (and require "
        "client certificates signed by tls_client_ca_file when that is set).",
    )
    grace_period_s: float = Field(
        10.0,
        ge=0,
        le=300,
        description="On SIGTERM, seconds that calls in flight get to finish before exit.",
    )
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        le=60,
        description="On SIGTERM, seconds to keep serving while NOT_SERVING so balancers notice.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe log level written (to stderr)."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or as one JSON object per line."
    )
    max_message_bytes: int = Field(
        16 * MIB, ge=1024, le=1024 * MIB, description="Largest gRPC message sent or received."
    )
    max_id_length: int = Field(
        1024,
        ge=1,
        le=8192,
        description="Longest id or name (characters) a request may carry: user, item and model "
        "ids, versions, domains; longer ones are INVALID_ARGUMENT.",
    )
    reflection: bool = Field(True, description="Serve gRPC server reflection.")
    blas_threads: int = Field(
        1,
        ge=0,
        le=256,
        description="Threads numpy's BLAS may use for one matrix product (0: the library's "
        "default, one per core). The request path's products are small and requests run "
        "concurrently, so more threads spin without making a request faster.",
    )
    tls_cert_file: Path | None = Field(None, description="Server certificate (PEM); enables TLS.")
    tls_key_file: Path | None = Field(None, description="Private key of the server certificate.")
    tls_client_ca_file: Path | None = Field(
        None, description="CA bundle that client certificates must chain to (mutual TLS)."
    )

    @model_validator(mode="after")
    def _check_tls(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.metrics_tls and self.tls_cert_file is None:
            raise ValueError("metrics_tls needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        check_key_pair(self.tls_cert_file, self.tls_key_file, "tls_cert_file", "tls_key_file")
        check_ca_file(self.tls_client_ca_file, "tls_client_ca_file")
        check_bind_host(self.host, self.describe("host"))
        if self.metrics_host is not None:
            check_bind_host(self.metrics_host, self.describe("metrics_host"))
        if self.port != 0 and self.port == self.metrics_port:
            raise ValueError("port and metrics_port must differ")
        return self

    @classmethod
    def describe(cls, name: str) -> str:
        """A setting with its environment variable and flag: "host (env X_HOST, flag --host)"."""
        return _where(str(cls.model_config.get("env_prefix", "")), name)


def _where(prefix: str, name: str) -> str:
    return f"{name} (env {prefix}{name.upper()}, flag --{name.replace('_', '-')})"


def check_bind_host(host: str, name: str) -> None:
    """ValueError unless `host` is an IP address or a name that resolves (what gRPC binds)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
        return
    except ValueError:
        pass
    if not bare or all(c.isdigit() or c in ".:" for c in bare):
        raise ValueError(f"{name}: {host!r} is not a valid IP address")
    try:
        socket.getaddrinfo(bare, None, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ValueError(f"{name}: {host!r} does not resolve ({exc})") from None


def check_key_pair(cert: Path | None, key: Path | None, cert_name: str, key_name: str) -> None:
    """ValueError unless `cert` is a PEM certificate (chain) and `key` its private key."""
    if cert is None or key is None:
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"{cert_name} ({cert}) and {key_name} ({key}) are not a PEM certificate and its "
            f"private key (swapped, mismatched or not PEM: {exc})"
        ) from None


def check_ca_file(ca: Path | None, name: str) -> None:
    """ValueError unless `ca` holds PEM CA certificates."""
    if ca is None:
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{name} ({ca}) holds no PEM CA certificate ({exc})") from None


S = TypeVar("S", bound=BaseSettings)


class SettingsInvalid(SystemExit):
    """Raised (exit code 2) when settings fail validation; the message names every bad field."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


class SettingsConflict(Exception):
    """Settings that cannot work together, found at start (e.g. against what an upstream
    accepts); a service's entry point turns it into exit code 2 and one line."""


def format_validation_error(cls: type[BaseSettings], exc: ValidationError) -> str:
    """One line: the class, then every bad field (with its variable and flag) and its error."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = (
            f"{loc} (env {prefix}{loc.upper()}, flag --{loc.replace('_', '-')}): " if loc else ""
        )
        message = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}{message}".replace("\n", " "))
    return f"invalid settings for {cls.__name__}: " + "; ".join(parts)


def refuse(message: str) -> NoReturn:
    """Write one line to stderr and exit 2 (SettingsInvalid): for settings that fail at start."""
    message = " ".join(message.split())
    sys.stderr.write(message + "\n")
    raise SettingsInvalid(message)


def load_settings(cls: type[S], argv: list[str] | None = None) -> S:
    """Build settings from the environment and flags, or exit 2 with a clear message."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return cls(_cli_parse_args=args)
    except ValidationError as exc:
        message = format_validation_error(cls, exc)
    except SettingsError as exc:
        message = f"invalid settings for {cls.__name__}: {exc}"
    refuse(message)
