"""Settings of the gateway (environment variables with the GATEWAY_ prefix, or flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from recsys.rpc.settings import ServerSettings, check_ca_file, check_key_pair
from recsys.rpc.tls import ClientTLS

_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "xds:", "vsock:")


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def split_targets(value: str) -> list[str]:
    """A comma list of gRPC targets. An `ipv4:`/`ipv6:` target is itself a comma list of
    addresses, so the entries after it that name no scheme belong to it:
    "ipv4:10.0.0.1:8001,10.0.0.2:8001" is one target (one channel, round robin over both);
    "10.0.0.1:8001,10.0.0.2:8001" is two."""
    targets: list[str] = []
    for part in _split(value):
        if targets and targets[-1].startswith(("ipv4:", "ipv6:")) and not part.startswith(_SCHEMES):
            targets[-1] += "," + part
        else:
            targets.append(part)
    return targets


class GatewaySettings(ServerSettings):
    """Gateway settings: docs/settings.md; behaviour: docs/services.md#gateway."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    port: int = Field(8000, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int = Field(9000, ge=0, le=65535, description="Prometheus /metrics port.")
    retrieval_target: str = Field(
        "dns:///localhost:8002", description="gRPC target of the retrieval service."
    )
    ranker_targets: str = Field(
        "dns:///localhost:8001",
        description="Comma list of ranker targets; one channel each, balanced round robin over "
        "every address a target resolves to (a headless Service's pods, or the addresses of an "
        "ipv4: target).",
    )
    ranker_shards: int = Field(
        4, ge=1, le=64, description="A candidate list is split into at most this many shards."
    )
    min_shard_size: int = Field(
        1024,
        ge=1,
        description="Fewest candidates in a shard: a list is split only when every shard gets at "
        "least this many (a ranking call costs about 1 ms of CPU before its first candidate; "
        "see docs/performance.md).",
    )
    retrieval_candidates: int = Field(
        500, ge=1, le=10_000, description="Personalised candidates asked of retrieval."
    )
    popular_candidates: int = Field(
        50, ge=0, le=10_000, description="Popular candidates merged in (0: none)."
    )
    default_deadline_ms: int = Field(
        1000, ge=1, le=600_000, description="Deadline of a call that comes without one."
    )
    deadline_margin_ms: float = Field(
        10.0, ge=0, le=10_000, description="Kept back from the caller's deadline to answer."
    )
    retrieval_deadline_fraction: float = Field(
        0.4, gt=0, le=1, description="Share of the remaining time that retrieval may take."
    )
    max_k: int = Field(100, ge=1, le=10_000, description="Largest k a request may ask for.")
    max_recent_items: int = Field(
        1000,
        ge=0,
        le=100_000,
        description="Most ids in a request's recent_item_ids (they are copied into every retrieval "
        "call); more are INVALID_ARGUMENT.",
    )
    domains: str = Field(
        "books",
        description="Comma list of the domains served (models <domain>-retrieval and "
        "<domain>-ranker).",
    )
    max_rank_attempts: int = Field(
        3, ge=1, le=10, description="Attempts per shard, on different replicas."
    )
    retry_budget_ratio: float = Field(
        0.1, ge=0, le=1, description="Retries allowed per upstream call made (token bucket)."
    )
    retry_budget_burst: float = Field(
        50.0, ge=1, le=10_000, description="Retries that may be spent at once."
    )
    ranker_eject_s: float = Field(
        1.0,
        ge=0,
        le=600,
        description="A ranker channel that refused a call, or left one unanswered longer than "
        "ranker_hedge_ms, is skipped this long.",
    )
    ranker_hedge_ms: float = Field(
        100.0,
        ge=0,
        le=60_000,
        description="A shard a ranker has not answered within this many milliseconds is also "
        "sent to another ranker channel (first answer wins) and the slow channel is skipped for "
        "ranker_eject_s; 0 disables hedging and slow-replica ejection.",
    )
    max_reconnect_backoff_ms: int = Field(
        1000, ge=100, le=120_000, description="Longest wait between reconnects to an upstream."
    )
    popular_refresh_s: float = Field(
        30.0, gt=0, le=86_400, description="Seconds between refreshes of the popular-items cache."
    )
    popular_cache_size: int = Field(
        500, ge=1, le=100_000, description="Popular items cached per domain."
    )
    model_repository: Path | None = Field(
        None, description="Optional: popular items from items.json before retrieval answers."
    )
    upstream_tls_ca_file: Path | None = Field(
        None, description="CA of the upstream servers' certificates; enables TLS to upstreams."
    )
    upstream_tls_cert_file: Path | None = Field(
        None, description="Client certificate for mutual TLS to upstreams."
    )
    upstream_tls_key_file: Path | None = Field(None, description="Key of the client certificate.")
    upstream_tls_server_name: str | None = Field(
        None, description="Name checked against the upstream certificates."
    )

    @model_validator(mode="after")
    def _check_gateway(self) -> GatewaySettings:
        if not self.domain_list:
            raise ValueError("domains must name at least one domain")
        if not self.ranker_target_list:
            raise ValueError("ranker_targets must name at least one target")
        if self.deadline_margin_ms >= self.default_deadline_ms:
            raise ValueError(
                "deadline_margin_ms must be below default_deadline_ms (no time would be left for "
                "the pipeline)"
            )
        if (self.upstream_tls_cert_file is None) != (self.upstream_tls_key_file is None):
            raise ValueError("upstream_tls_cert_file and upstream_tls_key_file go together")
        if self.upstream_tls_cert_file is not None and self.upstream_tls_ca_file is None:
            raise ValueError("upstream mutual TLS needs upstream_tls_ca_file")
        for name in ("upstream_tls_ca_file", "upstream_tls_cert_file", "upstream_tls_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        check_ca_file(self.upstream_tls_ca_file, "upstream_tls_ca_file")
        check_key_pair(
            self.upstream_tls_cert_file,
            self.upstream_tls_key_file,
            "upstream_tls_cert_file",
            "upstream_tls_key_file",
        )
        return self

    @property
    def domain_list(self) -> list[str]:
        return _split(self.domains)

    @property
    def ranker_target_list(self) -> list[str]:
        return split_targets(self.ranker_targets)

    @property
    def upstream_tls(self) -> ClientTLS | None:
        if self.upstream_tls_ca_file is None:
            return None
        return ClientTLS(
            self.upstream_tls_ca_file,
            self.upstream_tls_cert_file,
            self.upstream_tls_key_file,
            self.upstream_tls_server_name,
        )
