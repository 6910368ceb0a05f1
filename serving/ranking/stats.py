"""Per-version request and session-run statistics of the ranker, kept beside its Prometheus
metrics (which aggregate by model) and answered by the Open Inference Protocol's ModelStatistics
in Triton's terms: successes and failures, queue and compute time, executions by batch size."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    """A count and the total nanoseconds of what it counts."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class VersionStats:
    """What one model version did since it was loaded. Updated on the event loop only."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    inferences: int = 0  # candidates scored
    last_inference_ms: int = 0  # end of the last session run, ms since the epoch
    batches: dict[int, Duration] = field(default_factory=dict)  # requests per run -> runs

    def record_request(self, ok: bool, seconds: float) -> None:
        (self.success if ok else self.fail).add(seconds)

    def record_run(self, requests: int, candidates: int, seconds: float) -> None:
        self.compute.add(seconds)
        self.batches.setdefault(requests, Duration()).add(seconds)
        self.inferences += candidates
        self.last_inference_ms = int(time.time() * 1000)
