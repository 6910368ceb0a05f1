"""Settings of the ranking service (environment variables RANKING_*, or --flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from recsys.rpc.settings import ServerSettings

Provider = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model are served: the latest loadable one, all, or a fixed list."""

    kind: Literal["latest", "all", "specific"]
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        text = text.strip()
        if text in ("latest", "all"):
            return cls(text)  # type: ignore[arg-type]
        if text.startswith("specific:"):
            parts = [p.strip() for p in text.removeprefix("specific:").split(",") if p.strip()]
            if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(
                    f"version policy {text!r}: 'specific:' needs positive version numbers, "
                    "e.g. 'specific:1,2'"
                )
            return cls("specific", tuple(sorted({int(p) for p in parts})))
        raise ValueError(f"version policy {text!r}: use 'latest', 'all' or 'specific:1,2'")


class RankingSettings(ServerSettings):
    """Ranking settings: docs/settings.md; behaviour: docs/services.md#ranking-service."""

    model_config = SettingsConfigDict(env_prefix="RANKING_")

    port: int = Field(8001, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int = Field(
        9001, ge=0, le=65535, description="Prometheus /metrics HTTP port (0 picks a free one)."
    )
    model_repository: Path = Field(Path("/models"), description="Root of the model repository.")
    models: str = Field(
        "",
        description="Comma-separated model names to serve; empty serves every ranker in the "
        "repository.",
    )
    version_policy: str = Field(
        "latest", description="'latest', 'all' or 'specific:1,2' (versions served per model)."
    )
    poll_interval_s: float = Field(
        5.0,
        ge=0,
        description="Seconds between repository scans; 0 disables polling (SIGHUP still rescans).",
    )
    provider: Provider = Field(
        "auto", description="ONNX Runtime execution provider: auto (CUDA if present), cpu, cuda."
    )
    intra_op_threads: int = Field(0, ge=0, description="ORT intra-op threads (0: ORT default).")
    inter_op_threads: int = Field(0, ge=0, description="ORT inter-op threads (0: ORT default).")
    allow_spinning: bool = Field(
        True,
        description="Let idle ONNX Runtime pool threads spin (lower latency, more CPU); false "
        "leaves the cores to gRPC and the clients.",
    )
    solo_intra_op_threads: int = Field(
        0,
        ge=0,
        description="CPU: ORT intra-op threads of a second session per version that scores a "
        "request arriving while the server has nothing else in flight and the session is idle "
        "(lower latency at low load; its threads never spin; costs a second copy of the "
        "graph's weights; not with BATCHING=delay, which holds such a request open for "
        "others). 0: no second session.",
    )
    precision: Literal["fp32", "int8"] = Field(
        "fp32",
        description="The graph to serve: fp32, or int8 (the quantised graph training exports "
        "beside it; a version without one serves fp32 and logs a warning).",
    )
    io_binding: bool = Field(
        False,
        description="Run sessions through IO binding: inputs and outputs bound explicitly "
        "(device buffers on CUDA, outputs copied back once per run).",
    )
    max_batch_candidates: int = Field(
        1024,
        ge=1,
        description="Most candidates scored in one session run (dynamic batching); also the "
        "warm-up size. 1,024 is the CPU default measured in docs/performance.md (requests of "
        "about 1,000 candidates run alone, smaller ones share runs); on a GPU, where a larger "
        "batch costs little more, use more (the GPU overlay sets 16,384).",
    )
    batching: Literal["queued", "delay", "off"] = Field(
        "queued",
        description="Dynamic batching: 'queued' scores what is queued the moment a session run "
        "slot frees and never waits; 'delay' also holds a batch open up to MAX_QUEUE_DELAY_US "
        "while the session is idle; 'off' scores one request per run.",
    )
    max_queue_delay_us: int = Field(
        2000,
        ge=0,
        description="With BATCHING=delay: longest wait for more requests to join a batch while "
        "the session is idle (0: none).",
    )
    max_queue_requests: int = Field(
        256, ge=1, description="Requests waiting per model version before RESOURCE_EXHAUSTED."
    )
    max_candidates_per_request: int = Field(
        10000, ge=1, description="Most candidates one request may carry."
    )
    session_concurrency: int = Field(
        1, ge=1, le=64, description="Session runs in flight at once per model version."
    )

    @field_validator("version_policy")
    @classmethod
    def _check_policy(cls, value: str) -> str:
        VersionPolicy.parse(value)
        return value

    @property
    def model_names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    @property
    def policy(self) -> VersionPolicy:
        return VersionPolicy.parse(self.version_policy)

    @property
    def batching_enabled(self) -> bool:
        return self.batching != "off" and self.max_batch_candidates > 1
