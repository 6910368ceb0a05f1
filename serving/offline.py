"""Offline batch scoring: the gateway's recommendation pipeline run in-process, with retrieval and
ranking as local objects over the model repository, so that its answers equal the networked
service's.

    python -m serving.offline --repository=model_repository --domain=books --users=u1,u2 --k=10

prints one JSON object per user.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recsys.pipeline import (
    Pipeline,
    PipelineConfig,
    PipelineUnavailable,
    Ranked,
    RankQuery,
    Recommendation,
    RecommendQuery,
    Retrieval,
    RetrieveQuery,
    UpstreamError,
)
from recsys.repository import RepositoryError, list_versions, version_dir
from serving.ranking.model import ModelLoadError, RankerModel, SessionOptions, UnknownIds
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
        )
        return Retrieval(result.candidates, index.model_name, str(index.version))


class LocalRanker:
    """Ranker over the latest ranker model version of each domain, in-process (one replica), with
    the ranking service's own model loader (serving.ranking.model)."""

    def __init__(self, repository: Path, threads: int = 1) -> None:
        self.repository = Path(repository)
        self.options = SessionOptions(intra_op_threads=threads, inter_op_threads=1)
        self._models: dict[str, RankerModel] = {}

    @property
    def replicas(self) -> int:
        return 1

    def model(self, name: str, version: str) -> RankerModel:
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
        try:
            users, items = model.lookup(query.user_id, query.item_ids)
        except UnknownIds as exc:
            raise UpstreamError("NOT_FOUND", str(exc)) from exc
        scores = model.score(users, items)
        return Ranked(scores.tolist(), model.name, str(model.version))


def local_pipeline(repository: Path, config: PipelineConfig | None = None) -> Pipeline:
    return Pipeline(LocalRetriever(repository), LocalRanker(repository), config)


def to_json(user_id: str, result: Recommendation) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "items": [
            {
                "item_id": c.item_id,
                "score": c.score,
                "title": c.title,
                "source": c.source.name,
            }
            for c in result.items
        ],
        "model_versions": [{"model_name": n, "model_version": v} for n, v in result.model_versions],
        "degraded": result.degraded,
        "degradations": [
            {"reason": d.reason.name, "detail": d.detail} for d in result.degradations
        ],
    }


async def score_users(
    pipeline: Pipeline, domain: str, users: Sequence[str], k: int, exclude_seen: bool
) -> list[dict[str, Any]]:
    out = []
    for user_id in users:
        query = RecommendQuery(user_id=user_id, domain=domain, k=k, exclude_seen=exclude_seen)
        try:
            result = await pipeline.recommend(query, timeout=3600.0)
        except PipelineUnavailable as exc:
            out.append({"user_id": user_id, "error": str(exc)})
            continue
        out.append(to_json(user_id, result))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.offline", description="Recommend k items per user, in-process."
    )
    parser.add_argument("--repository", type=Path, required=True, help="model repository")
    parser.add_argument("--domain", required=True, help="target domain, e.g. books")
    parser.add_argument("--users", default="", help="comma list of user ids")
    parser.add_argument("--users-file", type=Path, help="file with one user id per line")
    parser.add_argument("--k", type=int, default=10, help="items per user")
    parser.add_argument("--include-seen", action="store_true", help="keep items already seen")
    parser.add_argument("--retrieval-candidates", type=int, default=500)
    parser.add_argument("--popular-candidates", type=int, default=50)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    users = [u.strip() for u in args.users.split(",") if u.strip()]
    if args.users_file:
        users += [u.strip() for u in args.users_file.read_text().splitlines() if u.strip()]
    if not users or args.k < 1:
        parser.error("give at least one user (--users or --users-file) and k >= 1")
    config = PipelineConfig(
        retrieval_candidates=args.retrieval_candidates,
        popular_candidates=args.popular_candidates,
        shards=args.shards,
    )
    try:
        retriever, ranker = LocalRetriever(args.repository), LocalRanker(args.repository)
        retriever.index(args.domain)  # load both models now: a missing one is an error here
        ranker.model(f"{args.domain}-ranker", "")
        pipeline = Pipeline(retriever, ranker, config)
        results = asyncio.run(
            score_users(pipeline, args.domain, users, args.k, not args.include_seen)
        )
    except (RepositoryError, UpstreamError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    for result in results:
        sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
