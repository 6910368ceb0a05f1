"""The model versions a ranker serves: the repository's version follower with the ranker's own
loading (an ONNX Runtime session and a batcher per version) and metrics."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from recsys.repository import FollowPolicy, VersionFollower, published_timestamp
from recsys.rpc.errors import InvalidRequest
from serving.ranking import metrics
from serving.ranking.batcher import Batcher, BatchingOptions
from serving.ranking.checks import parse_version
from serving.ranking.config import VersionPolicy
from serving.ranking.model import ProviderUnavailable, RankerModel, SessionOptions

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class ServedVersion:
    """A loaded version with its batcher."""

    model: RankerModel
    batcher: Batcher

    @property
    def version(self) -> int:
        return self.model.version


class ModelManager:
    """Serves versions of the configured models (or every ranker in the repository), following
    the repository with `recsys.repository.VersionFollower` (docs/model-repository.md)."""

    def __init__(
        self,
        root: Path,
        *,
        models: list[str],
        policy: VersionPolicy,
        session: SessionOptions,
        batching: BatchingOptions,
        poll_interval_s: float = 5.0,
        retry_base_s: float | None = None,
    ) -> None:
        self.root = Path(root)
        self.policy = policy
        self.session_options = session
        self.batching = batching
        self.poll_interval_s = poll_interval_s
        self.follower: VersionFollower[ServedVersion] = VersionFollower(
            self.root,
            kind="ranker",
            models=models,
            policy=FollowPolicy(policy.kind, tuple(policy.versions)),
            load=self._load,
            on_serve=self._serve,
            on_retire=self._retire,
            on_unload=self._unload,
            on_failure=lambda name: metrics.LOAD_FAILURES.labels(name).inc(),
            fatal=(ProviderUnavailable,),
            poll_interval_s=poll_interval_s,
            retry_base_s=retry_base_s,
        )

    # -- the ranker's loading ----------------------------------------------------------------

    def _load(self, name: str, version: int, directory: Path) -> ServedVersion:
        """On the loader thread: verify, load and warm the version (RankerModel.load)."""
        model = RankerModel.load(name, version, directory, self.session_options)
        return ServedVersion(model, Batcher(model, self.batching))

    def _serve(self, name: str, version: int, served: ServedVersion) -> None:
        served.batcher.start()
        metrics.MODEL_LOADED.labels(name, str(version), served.model.provider_label).set(1)
        published = published_timestamp(served.model.metadata)
        if published is not None:
            metrics.MODEL_PUBLISHED.labels(name, str(version)).set(published)

    def _retire(self, name: str, version: int, served: ServedVersion) -> None:
        metrics.MODEL_LOADED.labels(name, str(version), served.model.provider_label).set(0)

    async def _unload(self, name: str, version: int, served: ServedVersion) -> None:
        await served.batcher.close()
        _remove_version_series(name, str(version), served.model.provider_label)
        logger.info("Unloaded %s version %d", name, version)

    # -- what is served ---------------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        return self.follower.model_names()

    def ready(self) -> bool:
        """Every configured (or discovered) model has a version loaded and warmed."""
        return self.follower.ready()

    def versions(self, name: str) -> list[int]:
        return self.follower.versions(name)

    def is_known(self, name: str) -> bool:
        return self.follower.is_known(name)

    def resolve(self, name: str, version: str) -> ServedVersion:
        """The served version a request names (empty version: the latest served)."""
        if not name:
            raise InvalidRequest("model_name is required")
        return self.follower.resolve(name, parse_version(version))

    @contextlib.contextmanager
    def use(self, name: str, version: str) -> Iterator[ServedVersion]:
        """Hold a served version for the duration of one request (it is not unloaded meanwhile)."""
        if not name:
            raise InvalidRequest("model_name is required")
        with self.follower.use(name, parse_version(version)) as served:
            yield served

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every model, start polling, and return once every model is ready (a model with
        no loadable version keeps this waiting, and the service NOT_SERVING, until one appears)."""
        await self.follower.start()

    async def close(self) -> None:
        await self.follower.close()

    def request_reload(self) -> None:
        """Reload soon, retrying versions that failed before (SIGHUP)."""
        self.follower.request_reload()

    async def reload(self, *, retry_failed: bool = False) -> bool:
        """Scan the repository once and apply the version policy to every model."""
        return await self.follower.reload(retry_failed=retry_failed)


def _remove_version_series(model: str, version: str, provider: str) -> None:
    """Drop the per-version series of an unloaded version (loaded gauge, compute histogram), so
    /metrics lists only what is loaded. The request counters stay: they count what was answered."""
    metrics.MODEL_LOADED.remove(model, version, provider)
    with contextlib.suppress(KeyError):  # absent when the metadata had no created_at
        metrics.MODEL_PUBLISHED.remove(model, version)
    metrics.COMPUTE_DURATION.remove(model, version)
