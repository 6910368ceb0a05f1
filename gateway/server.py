"""The gateway server: upstream channels, the pipeline, the popular-items cache and the kit
server, run until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from gateway.clients import Upstreams
from gateway.config import GatewaySettings
from gateway.pipeline import (
    Pipeline,
    PipelineConfig,
    PopularItems,
    RetrieveQuery,
    RetryBudget,
    UpstreamError,
)
from gateway.popular import PopularRefresher
from gateway.servicer import SERVICE_NAME, Limits, RecommendationServicer
from recsys.candidates import Source
from recsys.rpc.server import RpcServer, serve_until_signal
from recsys.rpc.settings import SettingsConflict
from recsys.v1 import recommendation_pb2_grpc

logger = logging.getLogger(__name__)


def pipeline_config(settings: GatewaySettings) -> PipelineConfig:
    return PipelineConfig(
        retrieval_candidates=settings.retrieval_candidates,
        popular_candidates=settings.popular_candidates,
        shards=settings.ranker_shards,
        min_shard_size=settings.min_shard_size,
        max_rank_attempts=settings.max_rank_attempts,
        margin_s=settings.deadline_margin_ms / 1000,
        retrieval_fraction=settings.retrieval_deadline_fraction,
        hedge_s=settings.ranker_hedge_ms / 1000,
    )


class Gateway:
    """Everything the gateway holds for its lifetime."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.upstreams = Upstreams(settings)
        self.popular = PopularItems()
        self.pipeline = Pipeline(
            self.upstreams.retriever,
            self.upstreams.rankers,
            pipeline_config(settings),
            popular=self.popular,
            budget=RetryBudget(settings.retry_budget_ratio, settings.retry_budget_burst),
        )
        self.refresher = PopularRefresher(
            self.upstreams.retriever,
            self.popular,
            settings.domain_list,
            settings.popular_cache_size,
            settings.model_repository,
        )
        self.refresher.on_refresh = self.update_health
        self.server: RpcServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def answerable(self) -> bool:
        """Whether every domain can be answered: retrieval answered its last popular-items
        refresh, or popular items are cached to fall back on."""
        return all(
            self.refresher.retrieval_ok.get(domain) or self.popular.has(domain)
            for domain in self.settings.domain_list
        )

    async def update_health(self) -> None:
        """Health SERVING exactly while answers are possible (see answerable)."""
        if self.server is None:
            return
        serving = self.answerable()
        if serving != self.server.serving:
            if not serving:
                logger.warning(
                    "No answers possible: retrieval is down and no popular items are cached"
                )
            await self.server.set_serving(serving)

    async def check_retrieval_limits(self) -> None:
        """Refuse settings that ask retrieval for more candidates than it allows (its MAX_K),
        learnt by asking retrieval for that many popular items once. When retrieval does not
        answer the check cannot be made; it is logged and the gateway goes on."""
        s = self.settings
        needed = {
            "retrieval_candidates": s.retrieval_candidates,
            "max_k": s.max_k,
            "popular_candidates": s.popular_candidates,
            "popular_cache_size": s.popular_cache_size,
        }
        name, k = max(needed.items(), key=lambda item: item[1])
        query = RetrieveQuery(user_id="", domain=s.domain_list[0], k=k, sources=(Source.POPULAR,))
        try:
            await self.upstreams.retriever.retrieve(query, timeout=2.0)
        except UpstreamError as exc:
            if exc.code == "INVALID_ARGUMENT" and "k must be" in exc.detail:
                env = f"GATEWAY_{name.upper()}"
                raise SettingsConflict(
                    f"{name} (env {env}) = {k} asks retrieval for more candidates than it allows "
                    f"(raise RETRIEVAL_MAX_K or lower {env}): {exc.detail}"
                ) from None
            logger.warning(
                "Retrieval limits not checked (%s); keep GATEWAY_RETRIEVAL_CANDIDATES, "
                "GATEWAY_MAX_K and GATEWAY_POPULAR_CACHE_SIZE within RETRIEVAL_MAX_K",
                exc,
            )

    def build_server(self) -> RpcServer:
        servicer = RecommendationServicer(
            self.pipeline,
            domains=self.settings.domain_list,
            limits=Limits(
                max_k=self.settings.max_k,
                max_recent_items=self.settings.max_recent_items,
                max_id_length=self.settings.max_id_length,
            ),
            default_deadline_s=self.settings.default_deadline_ms / 1000,
            margin_s=self.settings.deadline_margin_ms / 1000,
        )
        self.server = RpcServer(
            self.settings,
            service_names=[SERVICE_NAME],
            register=lambda s: recommendation_pb2_grpc.add_RecommendationServiceServicer_to_server(
                servicer, s
            ),
        )
        return self.server

    async def start(self) -> None:
        """Connect to the upstreams, check the settings against retrieval's limits and fill the
        popular-items cache (best effort, a few seconds at most), set health to whether answers
        are possible, then keep the cache (and health) fresh. Raises SettingsConflict."""
        channels = [self.upstreams.retrieval_channel] + [
            channel for _, channel in self.upstreams.ranker_channels
        ]
        settled = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 2.0
        while loop.time() < give_up:
            if all(c.get_state(try_to_connect=True) in settled for c in channels):
                break
            await asyncio.sleep(0.02)
        await self.check_retrieval_limits()
        await self.refresher.refresh_once()
        await self.update_health()
        self._tasks.append(
            asyncio.get_running_loop().create_task(
                self.refresher.run(self.settings.popular_refresh_s)
            )
        )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.upstreams.close()


async def serve(settings: GatewaySettings) -> None:
    gateway = Gateway(settings)
    server = gateway.build_server()
    await serve_until_signal(
        server, on_startup=gateway.start, on_shutdown=gateway.close, owner_sets_health=True
    )
