"""Retrieval and ranking as in-process objects over a model repository, behind the same
protocols the gateway's gRPC clients implement, so the gateway's pipeline runs unchanged."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from gateway.pipeline import (
    Pipeline,
    PipelineConfig,
    Ranked,
    RankQuery,
    Retrieval,
    RetrieveQuery,
    UpstreamError,
)
from recsys.repository import list_versions, version_dir
from recsys.rpc.errors import RecsysError
from serving.ranking.engine import check_features
from serving.ranking.model import FEATURES, ModelLoadError, RankerModel, SessionOptions, UnknownIds
from serving.retrieval.index import IndexOptions, RetrievalIndex

logger = logging.getLogger(__name__)


class LocalRetriever:
    """Retriever over the latest retrieval model version of each domain, loaded in-process."""

    def __init__(self, repository: Path, options: IndexOptions | None = None) -> None:
        self.repository = Path(repository)
        self.options = options or IndexOptions()
        self._indexes: dict[str, RetrievalIndex] = {}

    def index(self, domain: str) -> RetrievalIndex:
        if domain not in self._indexes:
            name = f"{domain}-retrieval"
            versions = list_versions(self.repository, name)
            if not versions:
                raise UpstreamError("NOT_FOUND", f"no version of {name} in {self.repository}")
            directory = version_dir(self.repository, name, versions[-1])
            self._indexes[domain] = RetrievalIndex.load(directory, name, self.options)
        return self._indexes[domain]

    async def retrieve(self, query: RetrieveQuery, *, timeout: float) -> Retrieval:
        index = self.index(query.domain)
        result = index.retrieve(
            query.user_id,
            query.k,
            exclude_item_ids=query.exclude_item_ids,
            exclude_seen=query.exclude_seen,
            history_item_ids=query.history_item_ids,
            sources=query.sources,
            popular_k=query.popular_k,
        )
        return Retrieval(
            result.table, index.model_name, str(index.version), result.user, result.popular
        )


class LocalRanker:
    """Ranker over the latest ranker model version of each domain, in-process (one replica), with
    the ranking service's own model loader (serving.ranking.model)."""

    def __init__(self, repository: Path, threads: int = 1, *, suffix: str = "") -> None:
        """`suffix` scores with `<domain>-ranker<suffix>` instead of the model asked for (the
        system benchmark ranks with `-ranker` and the dot-product `-dot-ranker`)."""
        self.repository = Path(repository)
        self.suffix = suffix
        self.options = SessionOptions(intra_op_threads=threads, inter_op_threads=1)
        self._models: dict[str, RankerModel] = {}

    @property
    def replicas(self) -> int:
        return 1

    def model(self, name: str, version: str) -> RankerModel:
        name = f"{name.removesuffix('-ranker')}-{self.suffix}" if self.suffix else name
        if name not in self._models:
            versions = list_versions(self.repository, name)
            if not versions:
                raise UpstreamError("NOT_FOUND", f"no version of {name} in {self.repository}")
            directory = version_dir(self.repository, name, versions[-1])
            try:
                self._models[name] = RankerModel.load(name, versions[-1], directory, self.options)
            except ModelLoadError as exc:
                raise UpstreamError("UNAVAILABLE", str(exc)) from exc
        model = self._models[name]
        if version and version != str(model.version):
            raise UpstreamError("NOT_FOUND", f"version {version} of {name} is not loaded")
        return model

    async def rank(self, query: RankQuery, *, replica: int, timeout: float) -> Ranked:
        model = self.model(query.model_name, query.model_version)
        if model.kind == FEATURES:
            try:
                rows = check_features(
                    model,
                    query.features if query.features is not None else np.zeros(0, np.float32),
                    len(query.item_ids),
                    query.features_version,
                )
            except RecsysError as exc:
                raise UpstreamError(exc.code.name, str(exc)) from exc
            scores = model.score(rows, np.zeros(len(rows), np.int64))
            return Ranked(scores, model.name, str(model.version))
        try:
            users, items = model.lookup(query.user_id, query.item_ids)
        except UnknownIds as exc:
            raise UpstreamError("NOT_FOUND", str(exc)) from exc
        scores = model.score(users, items)
        return Ranked(scores, model.name, str(model.version))


def local_pipeline(repository: Path, config: PipelineConfig | None = None) -> Pipeline:
    return Pipeline(LocalRetriever(repository), LocalRanker(repository), config)
