"""The gateway's cache of each domain's popular items, the fallback when retrieval is down:
refreshed from retrieval, or read from the model repository before retrieval first answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from gateway.pipeline import PopularItems, RetrieveQuery, Retriever, UpstreamError
from recsys.candidates import CandidateTable, Source
from recsys.repository import ITEMS_FILE, RepositoryError, list_versions, read_items, version_dir

logger = logging.getLogger(__name__)


def popular_from_repository(repository: Path, domain: str, size: int) -> CandidateTable:
    """The most popular items of the latest version of the domain's retrieval (or ranker) model,
    from its items.json; empty when there is none."""
    for model in (f"{domain}-retrieval", f"{domain}-ranker"):
        for version in reversed(list_versions(repository, model)):
            path = version_dir(repository, model, version) / ITEMS_FILE
            try:
                items = read_items(path)
            except RepositoryError as exc:
                logger.warning("Cannot read popular items from %s: %s", path, exc)
                continue
            ids, titles = items.ids, items.titles
            popularity = np.asarray(items.popularity, dtype=float)
            order = np.lexsort((np.arange(len(ids)), -popularity))[:size]
            return CandidateTable.unscored(
                [ids[j] for j in order],
                Source.POPULAR,
                popularity[order],
                [titles[j] for j in order],
            )
    return CandidateTable.empty()


class PopularRefresher:
    """Keeps `cache` filled for every domain."""

    def __init__(
        self,
        retriever: Retriever,
        cache: PopularItems,
        domains: list[str],
        size: int,
        repository: Path | None = None,
    ) -> None:
        self.retriever = retriever
        self.cache = cache
        self.domains = domains
        self.size = size
        self.repository = repository
        # Whether retrieval answered the last refresh of each domain.
        self.retrieval_ok: dict[str, bool] = dict.fromkeys(domains, False)
        # Called after every refresh (the gateway updates its health).
        self.on_refresh: Callable[[], Awaitable[None]] | None = None

    async def refresh_once(self, timeout: float = 2.0) -> None:
        for domain in self.domains:
            query = RetrieveQuery(user_id="", domain=domain, k=self.size, sources=(Source.POPULAR,))
            try:
                answer = await self.retriever.retrieve(query, timeout=timeout)
                self.retrieval_ok[domain] = True
            except UpstreamError as exc:
                self.retrieval_ok[domain] = False
                logger.warning("Popular items of %s not refreshed: %s", domain, exc)
                if not self.cache.has(domain) and self.repository is not None:
                    items = await asyncio.to_thread(
                        popular_from_repository, self.repository, domain, self.size
                    )
                    if len(items):
                        self.cache.set(domain, items)
                        logger.info("Popular items of %s read from %s", domain, self.repository)
                continue
            if len(answer.candidates):
                self.cache.set(domain, answer.candidates)

    async def run(self, interval_s: float, retry_s: float = 1.0) -> None:
        """Refresh every `interval_s`, or every `retry_s` while a domain has no items yet."""
        while True:
            complete = all(self.cache.has(domain) for domain in self.domains)
            await asyncio.sleep(interval_s if complete else min(interval_s, retry_s))
            try:
                await self.refresh_once()
                if self.on_refresh is not None:
                    await self.on_refresh()
            except Exception:
                logger.exception("Refreshing popular items failed")
