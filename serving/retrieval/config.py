"""Settings of the retrieval service (environment variables with the RETRIEVAL_ prefix, or flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from recsys.rpc.settings import ServerSettings


class RetrievalSettings(ServerSettings):
    """Retrieval settings: docs/settings.md; behaviour: docs/services.md#retrieval-service."""

    model_config = SettingsConfigDict(env_prefix="RETRIEVAL_")

    port: int = Field(8002, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int = Field(9002, ge=0, le=65535, description="Prometheus /metrics port.")
    model_repository: Path = Field(Path("/models"), description="Root of the model repository.")
    models: str = Field(
        "",
        description='Comma list of retrieval models ("books-retrieval"); empty: every model '
        'whose name ends in "-retrieval".',
    )
    poll_interval_s: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="Seconds between repository polls; 0 disables polling (SIGHUP still reloads).",
    )
    exact_search_max_items: int = Field(
        50_000,
        ge=0,
        description="Versions without a stored index (items.faiss): exact inner-product search "
        "up to this many items, built at load.",
    )
    hnsw_max_items: int = Field(
        500_000,
        ge=0,
        description="Versions without a stored index: HNSW up to this many items, IVF-PQ with "
        "4-bit fast-scan codes above (docs/scale.md).",
    )
    max_k: int = Field(1000, ge=1, le=100_000, description="Largest k a request may ask for.")
    max_request_ids: int = Field(
        10_000,
        ge=0,
        le=1_000_000,
        description="Most ids in a request's exclude_item_ids, and in its history_item_ids; more "
        "are INVALID_ARGUMENT.",
    )
    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW graph degree (approximate index).")
    hnsw_ef_construction: int = Field(
        80, ge=8, le=2048, description="HNSW build-time beam width (higher: better graph)."
    )
    hnsw_ef_search: int = Field(
        128,
        ge=8,
        le=8192,
        description="HNSW search beam width (stored and built indexes); raised to the number of "
        "items fetched when that is larger.",
    )
    ivf_nprobe: int = Field(
        0,
        ge=0,
        le=65_536,
        description="IVF-PQ inverted lists searched per query (0: the version's own, recorded at "
        "publish; its default is an eighth of the index's lists).",
    )
    rerank_factor: int = Field(
        4,
        ge=1,
        le=1000,
        description="IVF-PQ candidates fetched per result asked for, re-scored exactly against the "
        "item embeddings.",
    )
    search_threads: int = Field(
        1, ge=1, le=256, description="FAISS OpenMP threads per search (1 suits single queries)."
    )
    search_workers: int = Field(
        4, ge=1, le=256, description="Threads that run searches (requests searched at once)."
    )
    onnx_threads: int = Field(
        1, ge=0, le=256, description="ONNX Runtime threads for the user tower at load (0: auto)."
    )

    @property
    def model_names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]
