"""The model versions a ranker serves: loading by version policy, polling the repository,
atomic swaps, unloading after the last request, and failures that leave the old version serving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from recsys.repository import (
    RepositoryError,
    list_models,
    list_versions,
    read_metadata,
    version_dir,
)
from recsys.rpc.errors import InvalidRequest, ModelNotReady, NotFound
from serving.ranking import metrics
from serving.ranking.batcher import Batcher, BatchingOptions
from serving.ranking.config import VersionPolicy
from serving.ranking.model import (
    ModelLoadError,
    ProviderUnavailable,
    RankerModel,
    SessionOptions,
)

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class ServedVersion:
    """A loaded version with its batcher; `refs` counts the requests using it right now."""

    model: RankerModel
    batcher: Batcher
    refs: int = 0
    retired: bool = False

    @property
    def version(self) -> int:
        return self.model.version


@dataclass
class _ModelState:
    served: dict[int, ServedVersion] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)


def parse_version(text: str) -> int | None:
    """'' -> None (latest); '3' -> 3; anything else is an invalid request."""
    text = text.strip()
    if not text:
        return None
    if not text.isdigit() or int(text) <= 0:
        raise InvalidRequest(f"model_version {text!r} is not a positive integer")
    return int(text)


class ModelManager:
    """Serves versions of the configured models (or every model in the repository).

    Loading runs on a loader thread, off the serving path; a loaded version is warmed before the
    swap, and the swap replaces the served set in one assignment on the event loop. A version that
    leaves the served set is unloaded once its last request is done (reference counting). A version
    that fails to load is logged and counted, and the versions already served stay.
    """

    def __init__(
        self,
        root: Path,
        *,
        models: list[str],
        policy: VersionPolicy,
        session: SessionOptions,
        batching: BatchingOptions,
        poll_interval_s: float = 5.0,
    ) -> None:
        self.root = Path(root)
        self.policy = policy
        self.session_options = session
        self.batching = batching
        self.poll_interval_s = poll_interval_s
        self._configured = list(models)
        self._models: dict[str, _ModelState] = {name: _ModelState() for name in models}
        self._lock = asyncio.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._poller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()

    # -- what is served ---------------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        return sorted(self._models)

    def ready(self) -> bool:
        """Every configured (or discovered) model has a version loaded and warmed."""
        return bool(self._models) and all(s.served for s in self._models.values())

    def versions(self, name: str) -> list[int]:
        state = self._models.get(name)
        return sorted(state.served) if state else []

    def is_known(self, name: str) -> bool:
        return name in self._models

    def resolve(self, name: str, version: str) -> ServedVersion:
        """The served version a request names (empty version: the latest served)."""
        if not name:
            raise InvalidRequest("model_name is required")
        state = self._models.get(name)
        if state is None:
            raise NotFound(f"model {name!r} is not served here (models: {self.model_names})")
        wanted = parse_version(version)
        served = state.served
        if not served:
            raise ModelNotReady(f"model {name!r} has no version loaded yet")
        if wanted is None:
            return served[max(served)]
        found = served.get(wanted)
        if found is None:
            raise NotFound(
                f"version {wanted} of model {name!r} is not served (served: {sorted(served)})"
            )
        return found

    @contextlib.contextmanager
    def use(self, name: str, version: str) -> Iterator[ServedVersion]:
        """Hold a served version for the duration of one request (it is not unloaded meanwhile)."""
        served = self.resolve(name, version)
        served.refs += 1
        try:
            yield served
        finally:
            served.refs -= 1
            if served.retired and served.refs == 0:
                self._unload(served)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every model, start polling, and return once every model is ready (a model with
        no loadable version keeps this waiting, and the service NOT_SERVING, until one appears)."""
        await self.reload()
        if self.poll_interval_s > 0 and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        if not self.ready():
            missing = [n for n, s in self._models.items() if not s.served] or ["(none found)"]
            logger.warning("Not ready: no loadable version yet for %s", ", ".join(missing))
        await self._ready.wait()

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        async with self._lock:
            for name, state in self._models.items():
                for served in state.served.values():
                    self._retire(name, served)
                state.served = {}
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._loader.shutdown(wait=False)

    def request_reload(self) -> None:
        """Reload soon, retrying versions that failed before (SIGHUP)."""
        logger.info("Reload requested")
        task = asyncio.get_running_loop().create_task(self.reload(retry_failed=True))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.reload()
            except Exception:
                logger.exception("Repository scan failed")

    async def reload(self, *, retry_failed: bool = False) -> None:
        """Scan the repository once and apply the version policy to every model."""
        async with self._lock:
            names = self._configured
            if not names:
                try:
                    names = [n for n in list_models(self.root) if self._is_ranker(n)]
                except RepositoryError as exc:
                    logger.error("Cannot scan the model repository: %s", exc)
                    names = []
            for name in names:
                state = self._models.setdefault(name, _ModelState())
                if retry_failed:
                    state.failed.clear()
                await self._reload_model(name, state)
            if self.ready():
                self._ready.set()

    def _is_ranker(self, name: str) -> bool:
        """Whether a model found in the repository is a ranker (other kinds, such as retrieval
        models published beside it, are not served here). Judged by the newest version's
        metadata; a version without readable metadata counts, so that its failure is reported."""
        if name in self._models:
            return True
        versions = list_versions(self.root, name)
        if not versions:
            return False
        try:
            kind = read_metadata(version_dir(self.root, name, versions[-1])).get("kind", "ranker")
        except RepositoryError:
            return True
        if kind != "ranker":
            logger.debug("Skipping %s: a %s model, not a ranker", name, kind)
        return bool(kind == "ranker")

    async def _load(self, name: str, version: int, state: _ModelState) -> RankerModel | None:
        directory = version_dir(self.root, name, version)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._loader, RankerModel.load, name, version, directory, self.session_options
            )
        except ProviderUnavailable:
            raise  # the machine, not the version, is wrong: the service stops
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ModelLoadError) else repr(exc)
            logger.error("Failed to load %s version %d: %s", name, version, reason)
            metrics.LOAD_FAILURES.labels(name).inc()
            state.failed[version] = reason
            return None

    async def _reload_model(self, name: str, state: _ModelState) -> None:
        available = list_versions(self.root, name)
        served = state.served
        loaded: dict[int, RankerModel] = {}
        if self.policy.kind == "latest":
            wanted: list[int] = []
            for version in reversed(available):
                if version in served:
                    wanted = [version]
                    break
                if version in state.failed:
                    continue
                model = await self._load(name, version, state)
                if model is not None:
                    loaded[version] = model
                    wanted = [version]
                    break
        else:
            candidates = (
                available
                if self.policy.kind == "all"
                else [v for v in self.policy.versions if v in available]
            )
            wanted = []
            for version in candidates:
                if version in served:
                    wanted.append(version)
                elif version not in state.failed:
                    model = await self._load(name, version, state)
                    if model is not None:
                        loaded[version] = model
                        wanted.append(version)
        if not wanted:
            if served:
                logger.warning(
                    "%s: no servable version in the repository (found %s); keeping %s",
                    name,
                    available,
                    sorted(served),
                )
            return
        if not loaded and set(wanted) == set(served):
            return
        new: dict[int, ServedVersion] = {}
        for version in wanted:
            if version in served:
                new[version] = served[version]
            else:
                batcher = Batcher(loaded[version], self.batching)
                batcher.start()
                new[version] = ServedVersion(loaded[version], batcher)
                metrics.MODEL_LOADED.labels(name, str(version), loaded[version].provider_label).set(
                    1
                )
        state.served = new  # the swap: requests resolve against the new set from here on
        gone = [s for v, s in served.items() if v not in new]
        logger.info(
            "%s: serving versions %s%s",
            name,
            sorted(new),
            f" (retiring {[s.version for s in gone]})" if gone else "",
        )
        for old in gone:
            self._retire(name, old)

    def _retire(self, name: str, served: ServedVersion) -> None:
        served.retired = True
        metrics.MODEL_LOADED.labels(name, str(served.version), served.model.provider_label).set(0)
        if served.refs == 0:
            self._unload(served)

    def _unload(self, served: ServedVersion) -> None:
        async def unload() -> None:
            await served.batcher.close()
            logger.info("Unloaded %s version %d", served.model.name, served.version)

        task = asyncio.get_running_loop().create_task(unload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
