"""The retrieval server: builds the kit server around the servicer, and runs it until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from recsys.rpc.server import RpcServer, serve_until_signal
from recsys.v1 import retrieval_pb2_grpc
from serving.retrieval.config import RetrievalSettings
from serving.retrieval.index import IndexOptions
from serving.retrieval.manager import IndexManager
from serving.retrieval.servicer import SERVICE_NAME, RetrievalServicer

logger = logging.getLogger(__name__)


def build_manager(settings: RetrievalSettings) -> IndexManager:
    options = IndexOptions(
        exact_search_max_items=settings.exact_search_max_items,
        hnsw_max_items=settings.hnsw_max_items,
        ivf_nprobe=settings.ivf_nprobe,
        rerank_factor=settings.rerank_factor,
        hnsw_m=settings.hnsw_m,
        hnsw_ef_construction=settings.hnsw_ef_construction,
        hnsw_ef_search=settings.hnsw_ef_search,
        onnx_threads=settings.onnx_threads,
    )
    return IndexManager(settings.model_repository, settings.model_names, options)


def build_server(settings: RetrievalSettings, manager: IndexManager) -> RpcServer:
    """The server, not started (tests use port 0)."""
    servicer = RetrievalServicer(
        manager,
        settings.max_k,
        max_request_ids=settings.max_request_ids,
        max_id_length=settings.max_id_length,
        search_threads=settings.search_threads,
        workers=settings.search_workers,
    )
    return RpcServer(
        settings,
        service_names=[SERVICE_NAME],
        register=lambda s: retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, s),
    )


async def serve(settings: RetrievalSettings) -> None:
    """Serve until SIGTERM: SERVING once a model is loaded; poll for new versions (and reload on
    SIGHUP)."""
    manager = build_manager(settings)
    server = build_server(settings, manager)
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()

    def reload() -> None:
        logger.info("SIGHUP: reloading the model repository")
        tasks.append(loop.create_task(_refresh(manager)))

    async def startup() -> None:
        await manager.wait_loaded()
        if settings.poll_interval_s > 0:
            tasks.append(loop.create_task(manager.poll_forever(settings.poll_interval_s)))
        loop.add_signal_handler(signal.SIGHUP, reload)

    async def shutdown() -> None:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    await serve_until_signal(server, on_startup=startup, on_shutdown=shutdown)


async def _refresh(manager: IndexManager) -> None:
    try:
        await asyncio.to_thread(manager.refresh)
    except Exception:
        logger.exception("Reloading the model repository failed")
