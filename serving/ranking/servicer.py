"""gRPC servicers of the ranker: recsys.v1.RankingService and the Open Inference Protocol
(inference.GRPCInferenceService), both thin: validate, call the engine, build the reply."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from recsys.inference import grpc_service_pb2 as pb
from recsys.inference import grpc_service_pb2_grpc as pb_grpc
from recsys.repository import RepositoryError, list_versions
from recsys.rpc.errors import InvalidRequest, ModelNotReady, NotFound
from recsys.rpc.metrics import package_version
from recsys.v1 import ranking_pb2, ranking_pb2_grpc
from serving.ranking import oip
from serving.ranking.checks import WIRE_FLOAT32, check_length, parse_version
from serving.ranking.engine import RankingEngine
from serving.ranking.manager import ServedVersion
from serving.ranking.model import PLATFORM
from serving.ranking.stats import Duration, VersionStats

SERVER_NAME = "recsys-ranker"

logger = logging.getLogger(__name__)


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """recsys.v1.RankingService: scores candidate item ids for one user id."""

    def __init__(self, engine: RankingEngine) -> None:
        self.engine = engine

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        scored = await self.engine.rank(
            request.model_name,
            request.model_version,
            request.user_id,
            request.item_ids,
            context.time_remaining(),
            allow_unknown_items=request.allow_unknown_items,
            features=request.features,
            features_version=request.features_version,
            features_f32=request.features_f32,
        )
        response = ranking_pb2.RankResponse(
            model_name=scored.model_name,
            model_version=str(scored.version),
            missing=[] if scored.missing is None else scored.missing.tolist(),
        )
        if request.packed_scores:
            response.scores_f32 = scored.scores.astype(WIRE_FLOAT32, copy=False).tobytes()
        else:
            response.scores.extend(scored.scores.tolist())
        return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol over the same models (tritonclient and KServe clients)."""

    def __init__(self, engine: RankingEngine, serving: Callable[[], bool] | None = None) -> None:
        self.engine = engine
        self.manager = engine.manager
        self.version = package_version()
        # Whether the server is SERVING (false while it drains at shutdown).
        self._serving = serving or (lambda: True)

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.manager.ready() and self._serving())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=[])

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        if not request.name:
            raise InvalidRequest("name is required")
        check_length("name", request.name, self.engine.max_id_length)
        try:
            wanted = parse_version(request.version)
        except InvalidRequest:
            # The protocol answers readiness, not errors: no such version is ready.
            return pb.ModelReadyResponse(ready=False)
        versions = self.manager.versions(request.name)
        ready = bool(versions) and (wanted is None or wanted in versions)
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        served = self._resolve(request.name, request.version)
        model = served.model
        response = pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in self.manager.versions(model.name)],
            platform=PLATFORM,
        )
        for spec in model.metadata["inputs"]:
            response.inputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
        for spec in model.metadata["outputs"]:
            response.outputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
        params = response.parameters
        params["execution_provider"].string_param = model.provider
        params["version"].string_param = str(model.version)
        params["max_batch_candidates"].int64_param = self.manager.batching.max_batch_candidates
        params["max_candidates_per_request"].int64_param = self.engine.max_candidates
        return response

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        decoded = oip.decode_inputs(request, self.engine.max_candidates)
        scored = await self.engine.infer(
            request.model_name,
            request.model_version,
            decoded.users,
            decoded.items,
            context.time_remaining(),
            decoded.features_version,
        )
        return oip.encode_scores(
            request, scored.scores, scored.model_name, scored.version, decoded.shape
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        served = self._resolve(request.name, request.version)
        return pb.ModelConfigResponse(config=oip.model_config(served.model))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        if request.name:
            pinned = self.engine.check_model(request.name, request.version)
            wanted = [(request.name, [int(pinned)] if pinned else None)]
        else:
            wanted = [(name, None) for name in self.manager.model_names]
        for name, versions in wanted:
            served_versions = self.manager.versions(name)
            if versions and versions[0] not in served_versions:
                raise NotFound(
                    f"version {versions[0]} of model {name!r} is not served "
                    f"(served: {served_versions})"
                )
            for version in versions or served_versions:
                stats = self.manager.resolve(name, str(version)).batcher.stats
                response.model_stats.append(_model_statistics(name, version, stats))
        return response

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for name in self.manager.model_names:
            served = set(self.manager.versions(name))
            try:
                published = set(list_versions(self.manager.root, name))
            except (RepositoryError, OSError, ValueError) as exc:
                # An unreadable model directory (or an odd entry in it): list what is served.
                logger.warning("Repository index of %s: cannot list its versions: %r", name, exc)
                published = set()
            for version in sorted(served | published):
                if version in served:
                    response.models.add(name=name, version=str(version), state="READY")
                elif not request.ready:
                    response.models.add(
                        name=name,
                        version=str(version),
                        state="UNAVAILABLE",
                        reason="published but not served: outside the version policy, or it "
                        "failed to load (see the server log)",
                    )
        return response

    def _resolve(self, name: str, version: str) -> ServedVersion:
        if not name:
            raise InvalidRequest("name is required")
        version = self.engine.check_model(name, version)
        if not self.manager.versions(name):
            raise ModelNotReady(f"model {name!r} has no version loaded yet")
        return self.manager.resolve(name, version)


def _duration(source: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=source.count, ns=source.ns)


def _model_statistics(name: str, version: int, stats: VersionStats) -> pb.ModelStatistics:
    """One version's statistics in the protocol's terms: an execution is a session run, an
    inference one candidate, a batch size the number of requests scored in one run."""
    return pb.ModelStatistics(
        name=name,
        version=str(version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inferences,
        execution_count=stats.compute.count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_infer=_duration(stats.compute),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(runs))
            for size, runs in sorted(stats.batches.items())
        ],
    )
