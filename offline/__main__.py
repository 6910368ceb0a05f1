"""Offline batch scoring: the gateway's recommendation pipeline run in-process, with retrieval and
ranking as local objects over the model repository, so that its answers equal the networked
service's.

    python -m offline --repository=model_repository --domain=books --users=u1,u2 --k=10

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

from gateway.pipeline import (
    Pipeline,
    PipelineConfig,
    PipelineUnavailable,
    Recommendation,
    RecommendQuery,
    UpstreamError,
)
from offline.local import LocalRanker, LocalRetriever
from recsys.repository import RepositoryError

logger = logging.getLogger(__name__)


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
        prog="python -m offline", description="Recommend k items per user, in-process."
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
