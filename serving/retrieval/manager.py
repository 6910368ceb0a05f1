"""The retrieval versions served, one per domain: the repository's version follower (the same
one the ranker uses) with retrieval's own loading (a FAISS index per version) and metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from recsys.repository import LATEST, VersionFollower, published_timestamp, read_metadata
from recsys.rpc.errors import ModelNotReady, NotFound
from serving.retrieval import metrics
from serving.retrieval.index import RETRIEVAL_SUFFIX, IndexOptions, RetrievalIndex, domain_of

logger = logging.getLogger(__name__)


class IndexManager:
    """The served version of each domain's retrieval model (the latest loadable one). `get()` is
    cheap and safe from any thread; `refresh()` blocks (SIGHUP and tests; it retries failed
    versions); `wait_loaded()` and `poll_forever()` run on the service's event loop."""

    def __init__(
        self,
        repository: Path,
        models: list[str],
        options: IndexOptions,
        *,
        poll_interval_s: float = 5.0,
        retry_base_s: float | None = None,
    ) -> None:
        self.repository = Path(repository)
        self.configured = list(models)
        for name in self.configured:
            domain_of(name)  # validates the name
        self.options = options
        self.follower: VersionFollower[RetrievalIndex] = VersionFollower(
            self.repository,
            kind="retrieval",
            models=self.configured,
            policy=LATEST,
            load=self._load,
            on_serve=self._serve,
            on_unload=self._unload,
            on_failure=lambda name: metrics.MODEL_LOAD_FAILURES.labels(name).inc(),
            accept=lambda name: name.endswith(RETRIEVAL_SUFFIX) and name != RETRIEVAL_SUFFIX,
            poll_interval_s=poll_interval_s,
            retry_base_s=retry_base_s,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._published: dict[tuple[str, int], float | None] = {}
        self._sync = threading.Lock()  # refresh() calls without a service loop, one at a time

    # -- retrieval's loading -----------------------------------------------------------------

    def _load(self, name: str, version: int, directory: Path) -> RetrievalIndex:
        index = RetrievalIndex.load(directory, name, self.options)  # verifies the metadata too
        self._published[(name, version)] = published_timestamp(read_metadata(directory))
        return index

    def _serve(self, name: str, version: int, index: RetrievalIndex) -> None:
        metrics.MODEL_LOADED.labels(name, str(version), index.index_kind).set(1)
        published = self._published.get((name, version))
        if published is not None:
            metrics.MODEL_PUBLISHED.labels(name, str(version)).set(published)

    def _unload(self, name: str, version: int, index: RetrievalIndex) -> None:
        # Searches still holding the index finish on it; its memory goes with the last of them.
        metrics.MODEL_LOADED.remove(name, str(version), index.index_kind)
        if self._published.pop((name, version), None) is not None:
            metrics.MODEL_PUBLISHED.remove(name, str(version))
        logger.info("Unloaded %s version %d", name, version)

    # -- what is served ---------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return self.follower.model_names()

    @property
    def domains(self) -> list[str]:
        return sorted(
            domain_of(n) for n in self.follower.model_names() if self.follower.versions(n)
        )

    def loaded(self) -> dict[str, RetrievalIndex]:
        out = {}
        for name in self.follower.model_names():
            index = self.follower.latest(name)
            if index is not None:
                out[domain_of(name)] = index
        return out

    def get(self, domain: str) -> RetrievalIndex:
        name = f"{domain}{RETRIEVAL_SUFFIX}"
        index = self.follower.latest(name)
        if index is not None:
            return index
        if self.follower.is_known(name):
            raise ModelNotReady(f"the retrieval model of domain {domain!r} is not loaded yet")
        raise NotFound(f"unknown domain {domain!r}")

    # -- following the repository -----------------------------------------------------------

    def refresh(self) -> bool:
        """Scan once, retrying versions that failed before; True when the served set changed.
        Runs on the service's loop when it is running (so scans never overlap), else here."""
        loop = self._loop
        if loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.follower.reload(retry_failed=True), loop)
            return future.result()
        with self._sync:
            return asyncio.run(self.follower.reload(retry_failed=True))

    async def wait_loaded(self, poll_s: float = 1.0) -> None:
        """Scan until at least one model is served (start-up)."""
        self._loop = asyncio.get_running_loop()
        while True:
            await self.follower.reload()
            if self.follower.any_ready():
                return
            logger.warning("No retrieval model loadable in %s yet; retrying", self.repository)
            await asyncio.sleep(poll_s)

    async def poll_forever(self, interval_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        await self.follower.poll(interval_s)

    async def close(self) -> None:
        await self.follower.close()
