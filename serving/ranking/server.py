"""Build the ranker's gRPC server (pure, for tests on port 0) and run it until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc

from recsys.inference import grpc_service_pb2_grpc as pb_grpc
from recsys.rpc.server import RpcServer, serve_until_signal
from recsys.v1 import ranking_pb2_grpc
from serving.ranking.batcher import BatchingOptions
from serving.ranking.config import RankingSettings
from serving.ranking.engine import RankingEngine
from serving.ranking.manager import ModelManager
from serving.ranking.model import SessionOptions, resolve_providers
from serving.ranking.servicer import InferenceServicer, RankingServicer

logger = logging.getLogger(__name__)

SERVICE_NAMES = ["recsys.v1.RankingService", "inference.GRPCInferenceService"]


def create_manager(settings: RankingSettings) -> ModelManager:
    """The model manager the settings describe; raises ProviderUnavailable for an unavailable
    'cuda' provider."""
    providers = resolve_providers(settings.provider)
    logger.info("Execution providers: %s", providers)
    return ModelManager(
        settings.model_repository,
        models=settings.model_names,
        policy=settings.policy,
        session=SessionOptions(
            providers=tuple(providers),
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            io_binding=settings.io_binding,
            precision=settings.precision,
            allow_spinning=settings.allow_spinning,
            solo_intra_op_threads=settings.solo_intra_op_threads,
            require_provider=settings.provider == "cuda",
            warmup_candidates=settings.max_batch_candidates,
        ),
        batching=BatchingOptions(
            max_batch_candidates=settings.max_batch_candidates,
            max_queue_delay_s=settings.max_queue_delay_us / 1e6,
            max_queue_requests=settings.max_queue_requests,
            concurrency=settings.session_concurrency,
            mode=settings.batching,
        ),
        poll_interval_s=settings.poll_interval_s,
    )


def build_server(settings: RankingSettings, manager: ModelManager) -> RpcServer:
    """The ranker's RpcServer: RankingService and the Open Inference Protocol on one port."""
    engine = RankingEngine(
        manager,
        max_candidates_per_request=settings.max_candidates_per_request,
        max_id_length=settings.max_id_length,
    )
    built: list[RpcServer] = []
    inference = InferenceServicer(engine, serving=lambda: built[0].serving)

    def register(server: grpc.aio.Server) -> None:
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(RankingServicer(engine), server)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)

    built.append(RpcServer(settings, service_names=SERVICE_NAMES, register=register))
    return built[0]


async def serve(settings: RankingSettings) -> None:
    """Start, load and warm every model, go SERVING; reload on SIGHUP; drain on SIGTERM."""
    manager = create_manager(settings)
    server = build_server(settings, manager)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, manager.request_reload)
    try:
        await serve_until_signal(server, on_startup=manager.start, on_shutdown=manager.close)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
