"""The scoring operations both APIs share: validate against the served version, score through
its batcher, and count every request by model, version, API and status."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Histogram

from recsys.features import FEATURE_LIMIT
from recsys.rpc.errors import FailedPrecondition, InvalidRequest, NotFound, status_for
from serving.ranking import metrics
from serving.ranking.checks import (
    check_ids,
    check_length,
    check_one_feature_form,
    feature_rows,
    parse_version,
    quote,
)
from serving.ranking.manager import ModelManager
from serving.ranking.model import FEATURES, RankerModel, UnknownIds
from serving.ranking.stats import VersionStats


@dataclass(frozen=True)
class Scored:
    """Scores of one request and the model version that computed all of them."""

    scores: np.ndarray
    model_name: str
    version: int
    # Where the version does not know the item (Rank with allow_unknown_items); None otherwise.
    missing: np.ndarray | None = None


class _Outcome:
    """Records one request's metrics when it ends, whatever the outcome."""

    def __init__(self, engine: RankingEngine, model: str, api: str) -> None:
        # Only names the server knows become label values: clients cannot grow the label set.
        self.engine = engine
        self.model = model if engine.manager.is_known(model) else ""
        self.api = api
        self.version = ""
        self.stats: VersionStats | None = None  # of the version that took the request
        self.start = time.perf_counter()

    def __enter__(self) -> _Outcome:
        self.engine.in_flight += 1
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.engine.in_flight -= 1
        if exc is None:
            status = "OK"
        elif isinstance(exc, Exception):
            status = status_for(exc)[0].name
        else:
            status = "CANCELLED"
        _requests_counter(self.model, self.version, self.api, status).inc()
        elapsed = time.perf_counter() - self.start
        if self.model:
            _duration_histogram(self.model).observe(elapsed)
        if self.stats is not None:
            self.stats.record_request(status == "OK", elapsed)


# Label lookups cost more than the increments; the label sets are few and bounded.
@functools.cache
def _requests_counter(model: str, version: str, api: str, status: str) -> Counter:
    return metrics.REQUESTS.labels(model, version, api, status)


@functools.cache
def _duration_histogram(model: str) -> Histogram:
    return metrics.REQUEST_DURATION.labels(model)


def check_features(
    model: RankerModel,
    features: Sequence[float] | np.ndarray,
    n: int,
    features_version: str,
    features_f32: bytes = b"",
) -> np.ndarray:
    """A feature ranker's input rows, checked: the retrieval version they come from must be the
    one the ranker expects (FAILED_PRECONDITION otherwise), then n rows of F finite values of at
    most FEATURE_LIMIT in magnitude (INVALID_ARGUMENT otherwise), given as `features` (values or
    an array) or as `features_f32` (little-endian float32 bytes). Returns FP32 [n, F]."""
    where = f"{model.name} version {model.version}"
    expected = model.features_version
    if features_version != expected:
        got = f"version {quote(features_version)}" if features_version else "no features_version"
        raise FailedPrecondition(
            f"{where} scores features of {model.features_model} version {expected}; the request "
            f"has {got} (rank with the {model.name} version published with that retrieval "
            "version)"
        )
    if isinstance(features, np.ndarray):
        features = features.ravel()
    rows = feature_rows(features, features_f32, n, model.feature_names, where)
    bad = ~np.isfinite(rows) | (np.abs(rows) > FEATURE_LIMIT)
    if bad.any():
        i, j = (int(x) for x in np.argwhere(bad)[0])
        raise InvalidRequest(
            f"features: {int(bad.sum())} values are NaN, infinite or above {FEATURE_LIMIT:g} in "
            f"magnitude, e.g. candidate {i} feature {model.feature_names[j]!r} = {rows[i, j]}"
        )
    return rows


class RankingEngine:
    """Rank (wire ids) and Infer (model indices) over the versions a ModelManager serves."""

    def __init__(
        self,
        manager: ModelManager,
        *,
        max_candidates_per_request: int,
        max_id_length: int = 1024,
    ) -> None:
        self.manager = manager
        self.max_candidates = max_candidates_per_request
        self.max_id_length = max_id_length
        # Requests inside rank/infer now (all on the event loop): a request alone here may take
        # the version's solo session.
        self.in_flight = 0

    @property
    def alone(self) -> bool:
        return self.in_flight == 1

    def check_model(self, name: str, version: str) -> str:
        """The version a request names, normalised ('' for the latest), after checking the model
        name (required, bounded, served here) and the version (a positive ASCII integer)."""
        if not name:
            raise InvalidRequest("model_name is required")
        check_length("model_name", name, self.max_id_length)
        if not self.manager.is_known(name):
            raise NotFound(
                f"model {quote(name)} is not served here (models: {self.manager.model_names})"
            )
        wanted = parse_version(version)
        return "" if wanted is None else str(wanted)

    def _check_count(self, n: int, what: str) -> None:
        if n == 0:
            raise InvalidRequest(f"no {what}: send at least one")
        if n > self.max_candidates:
            raise InvalidRequest(
                f"{n} {what} is more than this server's limit of {self.max_candidates} per "
                "request; split the list"
            )

    async def rank(
        self,
        model_name: str,
        version: str,
        user_id: str,
        item_ids: Sequence[str],
        timeout: float | None,
        *,
        allow_unknown_items: bool = False,
        features: Sequence[float] | np.ndarray = (),
        features_version: str = "",
        features_f32: bytes = b"",
    ) -> Scored:
        """Scores of item ids for a user id. With `allow_unknown_items`, ids the version does not
        know are scored -inf and flagged in `missing` instead of failing the request. A feature
        ranker scores `features` or `features_f32` (one of them; len(item_ids) rows, row-major)
        computed by retrieval version `features_version`, and looks neither the user nor the
        items up."""
        with _Outcome(self, model_name, "rank") as outcome:
            version = self.check_model(model_name, version)
            if not user_id:
                raise InvalidRequest("user_id is required")
            check_length("user_id", user_id, self.max_id_length)
            self._check_count(len(item_ids), "candidates (item_ids)")
            ids = item_ids if isinstance(item_ids, list) else list(item_ids)
            check_ids("item_ids", ids, self.max_id_length)
            check_one_feature_form(features, features_f32)
            with self.manager.use(model_name, version) as served:
                outcome.version = str(served.version)
                outcome.stats = served.batcher.stats
                model = served.model
                if model.kind == FEATURES:
                    rows = check_features(model, features, len(ids), features_version, features_f32)
                    if "" in ids:
                        raise InvalidRequest("item_ids must not contain empty ids")
                    scores = await served.batcher.score(
                        rows, np.zeros(len(ids), np.int64), timeout, solo=self.alone
                    )
                    missing = np.zeros(len(ids), bool) if allow_unknown_items else None
                    return Scored(scores, model.name, model.version, missing)
                try:
                    user = model.user_index_of(user_id)
                except UnknownIds as exc:
                    raise NotFound(f"{exc} (model {model.name} version {model.version})") from None
                items = model.item_indices(ids)
                unknown = items < 0
                if not unknown.any():
                    users = np.full(len(ids), user, dtype=np.int64)
                    scores = await served.batcher.score(users, items, timeout, solo=self.alone)
                    missing = np.zeros(len(ids), bool) if allow_unknown_items else None
                    return Scored(scores, model.name, model.version, missing)
                if "" in ids:
                    raise InvalidRequest("item_ids must not contain empty ids")
                if not allow_unknown_items:
                    where = np.flatnonzero(unknown)
                    unknown_ids = UnknownIds("item", [ids[i] for i in where[:5]], len(where))
                    raise NotFound(
                        f"{unknown_ids} (model {model.name} version {model.version}); "
                        "allow_unknown_items scores them as missing instead"
                    )
                scores = np.full(len(ids), -np.inf, dtype=np.float32)
                known = np.flatnonzero(~unknown)
                if known.size:
                    users = np.full(known.size, user, dtype=np.int64)
                    scores[known] = await served.batcher.score(
                        users, items[known], timeout, solo=self.alone
                    )
                return Scored(scores, model.name, model.version, unknown)

    async def infer(
        self,
        model_name: str,
        version: str,
        users: np.ndarray,
        items: np.ndarray,
        timeout: float | None,
        features_version: str = "",
    ) -> Scored:
        """Score index pairs, or feature rows ([N, F] FP32 as `users`) for a feature ranker
        (already checked for names, dtypes and shapes)."""
        with _Outcome(self, model_name, "oip") as outcome:
            version = self.check_model(model_name, version)
            self._check_count(len(items), "candidates (elements of item_index)")
            with self.manager.use(model_name, version) as served:
                outcome.version = str(served.version)
                outcome.stats = served.batcher.stats
                model = served.model
                if (users.ndim == 2) != (model.kind == FEATURES):
                    takes = "features" if model.kind == FEATURES else "user_index and item_index"
                    raise InvalidRequest(
                        f"{model.name} version {model.version} takes {takes} (see its metadata)"
                    )
                if model.kind == FEATURES:
                    if users.shape[1] != len(model.feature_names):
                        raise InvalidRequest(
                            f"input 'features': shape {list(users.shape)}; {model.name} version "
                            f"{model.version} takes [N, {len(model.feature_names)}]"
                        )
                    rows = check_features(model, users, len(users), features_version)
                    scores = await served.batcher.score(rows, items, timeout, solo=self.alone)
                    return Scored(scores, model.name, model.version)
                for name, array, bound in (
                    ("user_index", users, model.n_users),
                    ("item_index", items, model.n_items),
                ):
                    bad = np.flatnonzero((array < 0) | (array >= bound))
                    if bad.size:
                        raise InvalidRequest(
                            f"input {name!r}: {bad.size} values out of range [0, {bound}) for "
                            f"{model.name} version {model.version}, e.g. element {bad[0]} = "
                            f"{int(array[bad[0]])}"
                        )
                scores = await served.batcher.score(users, items, timeout, solo=self.alone)
                return Scored(scores, model.name, model.version)
