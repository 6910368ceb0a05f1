"""The feature contract between retrieval and a feature ranker in the pipeline: features travel
with the retrieval version that computed them; a ranker that expects another version refuses
(FAILED_PRECONDITION) and the shard is re-sent pinned to the ranker version of that publish, or
the answer degrades to retrieval order."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from gateway.pipeline import (
    Pipeline,
    PipelineConfig,
    PopularItems,
    Ranked,
    RankQuery,
    Reason,
    Recommendation,
    RecommendQuery,
    Retrieval,
    RetrieveQuery,
    UpstreamError,
)
from recsys.candidates import Candidate, CandidateTable, Source, SourceScore
from recsys.features import FEATURE_NAMES, UserContext, candidate_features


def scored(item: str, n: int, source: Source) -> Candidate:
    scores = (SourceScore(Source.ANN, 1.0 - n / 100, n + 1 if source == Source.ANN else 0),)
    return Candidate(item, 1.0 - n / 100, source, "", scores)


@dataclass
class Retriever:
    version: str = "4"

    async def retrieve(self, query: RetrieveQuery, *, timeout: float) -> Retrieval:
        source = Source.POPULAR if query.sources == (Source.POPULAR,) else Source.ANN
        items = [scored(f"i{n}", n, source) for n in range(40)][: query.k]
        user = UserContext(known=True, target_history=2)
        return Retrieval(CandidateTable.from_rows(items), "books-retrieval", self.version, user)


@dataclass
class FeatureRankers:
    """Replicas serving one ranker version each; version v expects retrieval version v."""

    versions: list[str]
    calls: list[RankQuery] = field(default_factory=list)

    @property
    def replicas(self) -> int:
        return len(self.versions)

    async def rank(self, query: RankQuery, *, replica: int, timeout: float) -> Ranked:
        self.calls.append(query)
        wanted = query.model_version
        if wanted and wanted not in self.versions:
            raise UpstreamError("NOT_FOUND", f"version {wanted} not loaded")
        version = wanted or self.versions[replica % len(self.versions)]
        if query.features_version != version:
            raise UpstreamError("FAILED_PRECONDITION", f"expects retrieval version {version}")
        assert query.features is not None
        assert query.features.shape == (len(query.item_ids), len(FEATURE_NAMES))
        # Reverse retrieval order: the last candidates score highest.
        return Ranked((-query.features[:, 0]).tolist(), query.model_name, version)


CONFIG = PipelineConfig(retrieval_candidates=20, popular_candidates=0, shards=2, min_shard_size=8)


def recommend(pipeline: Pipeline) -> Recommendation:
    return asyncio.run(pipeline.recommend(RecommendQuery("u1", "books", 5), timeout=5))


def test_features_and_their_version_travel_with_every_shard() -> None:
    rankers = FeatureRankers(["4"])
    result = recommend(Pipeline(Retriever(), rankers, CONFIG))
    assert not result.degraded
    assert [c.item_id for c in result.items] == ["i19", "i18", "i17", "i16", "i15"]
    assert {q.features_version for q in rankers.calls} == {"4"}
    expected = candidate_features(
        CandidateTable.from_rows([scored(f"i{n}", n, Source.ANN) for n in range(20)]),
        UserContext(known=True, target_history=2),
    )
    got = np.concatenate([q.features for q in rankers.calls if q.features is not None])
    np.testing.assert_array_equal(got, expected)


def test_a_ranker_of_another_version_is_refused_and_the_shard_pinned_to_the_publish() -> None:
    # replica 0 serves version 5 (expects retrieval 5), replica 1 serves version 4
    rankers = FeatureRankers(["5", "4"])
    result = recommend(Pipeline(Retriever("4"), rankers, CONFIG))
    assert not result.degraded
    assert ("books-ranker", "4") in result.model_versions
    assert any(q.model_version == "4" for q in rankers.calls)  # re-sent pinned


def test_no_ranker_for_the_features_version_degrades_to_retrieval_order() -> None:
    rankers = FeatureRankers(["5"])
    result = recommend(Pipeline(Retriever("4"), rankers, CONFIG))
    assert [d.reason for d in result.degradations] == [Reason.RANKING_UNAVAILABLE]
    assert [c.item_id for c in result.items] == [f"i{n}" for n in range(5)]


def test_with_retrieval_down_a_feature_ranker_leaves_cached_popular_items_unranked() -> None:
    class Down:
        async def retrieve(self, query: RetrieveQuery, *, timeout: float) -> Retrieval:
            raise UpstreamError("UNAVAILABLE", "retrieval down")

    class NeedsFeatures(FeatureRankers):
        async def rank(self, query: RankQuery, *, replica: int, timeout: float) -> Ranked:
            self.calls.append(query)
            assert query.features is None and query.features_version == ""
            raise UpstreamError("FAILED_PRECONDITION", "no features_version")

    popular = PopularItems()
    popular.set(
        "books",
        CandidateTable.from_rows([Candidate(f"p{n}", 10.0 - n, Source.POPULAR) for n in range(8)]),
    )
    pipeline = Pipeline(Down(), NeedsFeatures(["4"]), CONFIG, popular=popular)
    result = recommend(pipeline)
    assert [c.item_id for c in result.items] == ["p0", "p1", "p2", "p3", "p4"]
    reasons = {d.reason for d in result.degradations}
    assert reasons == {Reason.RETRIEVAL_UNAVAILABLE, Reason.RANKING_UNAVAILABLE}
