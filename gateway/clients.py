"""gRPC clients of the upstream services, one channel per upstream target created at start; they
implement the pipeline's Retriever and Ranker and turn failures into UpstreamError."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

from gateway import metrics
from gateway.config import GatewaySettings
from recsys.pipeline import (
    Candidate,
    Ranked,
    RankQuery,
    Retrieval,
    RetrieveQuery,
    Source,
    UpstreamError,
)
from recsys.rpc.tls import create_aio_channel
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

logger = logging.getLogger(__name__)


def upstream_error(upstream: str, exc: grpc.RpcError) -> UpstreamError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    metrics.UPSTREAM_ERRORS.labels(upstream, code.name).inc()
    return UpstreamError(code.name, f"{upstream}: {detail or ''}".rstrip(": "))


class GrpcRetriever:
    """Retriever over the retrieval service's channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        self._duration = metrics.UPSTREAM_DURATION.labels("retrieval", "Retrieve")

    async def retrieve(self, query: RetrieveQuery, *, timeout: float) -> Retrieval:
        request = retrieval_pb2.RetrieveRequest(
            user_id=query.user_id,
            domain=query.domain,
            k=query.k,
            exclude_item_ids=query.exclude_item_ids,
            exclude_seen=query.exclude_seen,
            history_item_ids=query.history_item_ids,
            sources=[int(s) for s in query.sources],  # type: ignore[misc]
        )
        start = time.perf_counter()
        try:
            reply = await self.stub.Retrieve(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise upstream_error("retrieval", exc) from None
        finally:
            self._duration.observe(time.perf_counter() - start)
        return Retrieval(
            [Candidate(c.item_id, c.score, Source(c.source), c.title) for c in reply.candidates],
            reply.model.model_name,
            reply.model.model_version,
        )


@dataclass
class _RankerChannel:
    target: str
    channel: grpc.aio.Channel
    stub: ranking_pb2_grpc.RankingServiceStub
    ejected_until: float = 0.0


class GrpcRankers:
    """Ranker over one channel per configured target. A target that resolves to several
    addresses (a headless Service) is balanced round robin by its channel; several targets are
    spread by the `replica` hint, skipping for a while a channel that refused a call."""

    def __init__(self, channels: list[tuple[str, grpc.aio.Channel]], eject_s: float = 1.0) -> None:
        if not channels:
            raise ValueError("at least one ranker channel is required")
        self._channels = [
            _RankerChannel(target, channel, ranking_pb2_grpc.RankingServiceStub(channel))
            for target, channel in channels
        ]
        self.eject_s = eject_s
        self._duration = metrics.UPSTREAM_DURATION.labels("ranker", "Rank")

    @property
    def replicas(self) -> int:
        return len(self._channels)

    def _pick(self, replica: int) -> _RankerChannel:
        n = len(self._channels)
        now = time.monotonic()
        for step in range(n):
            candidate = self._channels[(replica + step) % n]
            if candidate.ejected_until <= now:
                return candidate
        return self._channels[replica % n]  # every one was ejected: try the hinted one anyway

    async def rank(self, query: RankQuery, *, replica: int, timeout: float) -> Ranked:
        chosen = self._pick(replica)
        request = ranking_pb2.RankRequest(
            model_name=query.model_name,
            model_version=query.model_version,
            user_id=query.user_id,
            item_ids=query.item_ids,
        )
        start = time.perf_counter()
        try:
            reply = await chosen.stub.Rank(request, timeout=timeout)
        except grpc.RpcError as exc:
            error = upstream_error("ranker", exc)
            if error.code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED") and self.eject_s > 0:
                chosen.ejected_until = time.monotonic() + self.eject_s
            raise error from None
        finally:
            self._duration.observe(time.perf_counter() - start)
        return Ranked(list(reply.scores), reply.model_name, reply.model_version)


class Upstreams:
    """Every upstream channel of the gateway, created once at start."""

    def __init__(self, settings: GatewaySettings) -> None:
        tls = settings.upstream_tls
        limit = settings.max_message_bytes
        self.retrieval_channel = create_aio_channel(
            settings.retrieval_target, max_message_bytes=limit, tls=tls, round_robin=True
        )
        self.ranker_channels = [
            (
                target,
                create_aio_channel(target, max_message_bytes=limit, tls=tls, round_robin=True),
            )
            for target in settings.ranker_target_list
        ]
        self.retriever = GrpcRetriever(self.retrieval_channel)
        self.rankers = GrpcRankers(self.ranker_channels, settings.ranker_eject_s)
        logger.info(
            "Upstreams: retrieval %s, rankers %s",
            settings.retrieval_target,
            ", ".join(settings.ranker_target_list),
        )

    async def close(self) -> None:
        await self.retrieval_channel.close(None)
        for _, channel in self.ranker_channels:
            await channel.close(None)
