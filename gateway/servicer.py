"""RecommendationService over gRPC: validate, derive the deadline, run the pipeline, convert."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import grpc
from prometheus_client import Histogram

from gateway import metrics
from gateway.pipeline import (
    Pipeline,
    PipelineDeadline,
    PipelineUnavailable,
    Recommendation,
    RecommendQuery,
)
from recsys.rpc.errors import (
    DeadlineExceeded,
    InvalidRequest,
    UpstreamUnavailable,
    check_id,
    check_ids,
    shorten,
)
from recsys.v1 import common_pb2, recommendation_pb2, recommendation_pb2_grpc

SERVICE_NAME = "recsys.v1.RecommendationService"


@dataclass(frozen=True)
class Limits:
    """What a request may carry (the gateway's settings max_k, max_recent_items, max_id_length)."""

    max_k: int = 100
    max_recent_items: int = 1000
    max_id_length: int = 1024


def validate(
    request: recommendation_pb2.RecommendRequest, domains: set[str], limits: Limits
) -> None:
    """INVALID_ARGUMENT for a request the pipeline must not run; messages repeat at most a short
    escaped prefix of a client's id."""
    if not request.user_id:
        raise InvalidRequest("user_id is required")
    check_id(request.user_id, "user_id", limits.max_id_length)
    if not request.domain:
        raise InvalidRequest("domain is required")
    if request.domain not in domains:
        raise InvalidRequest(
            f"unknown domain {shorten(request.domain)}; served: {', '.join(sorted(domains))}"
        )
    if request.k < 1 or request.k > limits.max_k:
        raise InvalidRequest(f"k must be between 1 and {limits.max_k}, got {request.k}")
    check_ids(
        request.recent_item_ids,
        "recent_item_ids",
        limits.max_recent_items,
        limits.max_id_length,
    )


def to_response(result: Recommendation) -> recommendation_pb2.RecommendResponse:
    return recommendation_pb2.RecommendResponse(
        items=[
            recommendation_pb2.RecommendedItem(
                item_id=c.item_id,
                score=c.score,
                title=c.title,
                source=int(c.source),  # type: ignore[arg-type]
                ranked=c.ranked,
                sources=[int(s) for s in c.proposed_by],  # type: ignore[misc]
                retrieval_position=position,
            )
            for c, position in zip(
                result.items,
                result.retrieval_positions or [0] * len(result.items),
                strict=True,
            )
        ],
        model_versions=[
            common_pb2.ModelVersion(model_name=name, model_version=version)
            for name, version in result.model_versions
        ],
        degraded=result.degraded,
        degradations=[
            recommendation_pb2.Degradation(reason=int(d.reason), detail=d.detail)  # type: ignore[arg-type]
            for d in result.degradations
        ],
    )


class RecommendationServicer(recommendation_pb2_grpc.RecommendationServiceServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        *,
        domains: list[str],
        limits: Limits,
        default_deadline_s: float,
        margin_s: float,
    ) -> None:
        self.pipeline = pipeline
        self.domains = set(domains)
        self.limits = limits
        self.default_deadline_s = default_deadline_s
        self.margin_s = margin_s

    async def Recommend(
        self, request: recommendation_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> recommendation_pb2.RecommendResponse:
        start = time.perf_counter()
        validate(request, self.domains, self.limits)
        remaining = context.time_remaining()
        timeout = self.default_deadline_s if remaining is None else float(remaining)
        if timeout <= self.margin_s:
            raise DeadlineExceeded("the deadline is too short to answer")
        query = RecommendQuery(
            user_id=request.user_id,
            domain=request.domain,
            k=request.k,
            # Unset means true: a just-viewed item is never recommended back by default.
            exclude_seen=request.exclude_seen if request.HasField("exclude_seen") else True,
            recent_item_ids=tuple(request.recent_item_ids),
        )
        try:
            result = await self.pipeline.recommend(query, timeout=timeout)
        except PipelineUnavailable as exc:
            raise UpstreamUnavailable(str(exc)) from None
        except PipelineDeadline as exc:
            raise DeadlineExceeded(str(exc)) from None
        for stage, seconds in result.timings.items():
            _stage(stage).observe(seconds)
        for degradation in result.degradations:
            metrics.DEGRADED.labels(degradation.reason.name.lower()).inc()
        convert = time.perf_counter()
        response = to_response(result)
        now = time.perf_counter()
        _stage("response").observe(now - convert)
        _stage("total").observe(now - start)
        return response


# Label lookups cost more than the observations; the stages are few and fixed.
@functools.cache
def _stage(stage: str) -> Histogram:
    return metrics.STAGE_DURATION.labels(stage)
