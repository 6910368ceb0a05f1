"""Follows the model repository: loads the latest retrieval version of each domain, polls for new
ones and swaps them in atomically, keeping the previous version when a new one fails."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from recsys.repository import RepositoryError, list_models, list_versions, version_dir
from recsys.rpc.errors import ModelNotReady, NotFound
from serving.retrieval import metrics
from serving.retrieval.index import RETRIEVAL_SUFFIX, IndexOptions, RetrievalIndex, domain_of

logger = logging.getLogger(__name__)


class IndexManager:
    """The served version of each domain's retrieval model. `refresh()` is blocking (run it in a
    thread); `get()` is cheap and safe from any thread."""

    def __init__(self, repository: Path, models: list[str], options: IndexOptions) -> None:
        self.repository = Path(repository)
        self.configured = list(models)
        for name in self.configured:
            domain_of(name)  # validates the name
        self.options = options
        self._indexes: dict[str, RetrievalIndex] = {}
        self._failed: dict[str, set[int]] = {}
        self._lock = threading.Lock()  # one refresh at a time

    def model_names(self) -> list[str]:
        if self.configured:
            return self.configured
        try:
            return [m for m in list_models(self.repository) if m.endswith(RETRIEVAL_SUFFIX)]
        except RepositoryError as exc:
            logger.warning("%s", exc)
            return []

    @property
    def domains(self) -> list[str]:
        return sorted(self._indexes)

    def loaded(self) -> dict[str, RetrievalIndex]:
        return dict(self._indexes)

    def get(self, domain: str) -> RetrievalIndex:
        index = self._indexes.get(domain)
        if index is not None:
            return index
        if any(domain_of(name) == domain for name in self.model_names()):
            raise ModelNotReady(f"the retrieval model of domain {domain!r} is not loaded yet")
        raise NotFound(f"unknown domain {domain!r}")

    def refresh(self) -> bool:
        """Load the newest loadable version of every model that is newer than the served one.
        Returns True when anything changed."""
        changed = False
        with self._lock:
            for name in self.model_names():
                changed |= self._refresh_model(name)
        return changed

    def _refresh_model(self, name: str) -> bool:
        domain = domain_of(name)
        current = self._indexes.get(domain)
        failed = self._failed.setdefault(name, set())
        newer = [
            v
            for v in reversed(list_versions(self.repository, name))
            if v not in failed and (current is None or v > current.version)
        ]
        for version in newer:
            directory = version_dir(self.repository, name, version)
            try:
                index = RetrievalIndex.load(directory, name, self.options)
            except (RepositoryError, OSError, ValueError) as exc:
                failed.add(version)
                metrics.MODEL_LOAD_FAILURES.labels(name).inc()
                logger.error("Cannot serve %s version %d: %s", name, version, exc)
                continue
            self._indexes[domain] = index
            metrics.MODEL_LOADED.labels(name, str(version), index.index_kind).set(1)
            if current is not None:
                metrics.MODEL_LOADED.labels(name, str(current.version), current.index_kind).set(0)
                logger.info("%s: version %d replaces %d", name, version, current.version)
            return True
        return False

    async def wait_loaded(self, poll_s: float = 1.0) -> None:
        """Refresh until at least one model is served (start-up)."""
        while True:
            await asyncio.to_thread(self.refresh)
            if self._indexes:
                return
            logger.warning("No retrieval model loadable in %s yet; retrying", self.repository)
            await asyncio.sleep(poll_s)

    async def poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                logger.exception("Polling the model repository failed")
