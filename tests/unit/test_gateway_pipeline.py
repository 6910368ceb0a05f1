"""The recommendation pipeline without gRPC: merging, sharding, top k, degradation, retries,
version pinning and cancellation, over in-memory upstreams that behave like the services."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from gateway.pipeline import (
    Pipeline,
    PipelineConfig,
    PipelineDeadline,
    PipelineUnavailable,
    PopularItems,
    Ranked,
    RankQuery,
    Reason,
    RecommendQuery,
    Retrieval,
    RetrieveQuery,
    RetryBudget,
    Source,
    UpstreamError,
    choose_version,
    merge_candidates,
    split_shards,
    top_k,
)
from recsys.candidates import Candidate, CandidateTable

ITEMS = [f"i{j}" for j in range(200)]


def cand(item: str, score: float = 0.0, source: Source = Source.ANN) -> Candidate:
    return Candidate(item, score, source, f"title {item}")


@dataclass
class FakeRetriever:
    """ANN candidates i0, i1, ... for known users ("u*"), popular items from the end of the
    catalogue; `error` makes every call fail. `answers_popular`: the popular list asked for with
    `popular_k` comes in the same answer (a server that knows the field)."""

    error: UpstreamError | None = None
    known_prefix: str = "u"
    calls: list[RetrieveQuery] = field(default_factory=list)
    answers_popular: bool = False

    async def retrieve(self, query: RetrieveQuery, *, timeout: float) -> Retrieval:
        self.calls.append(query)
        if self.error is not None:
            raise self.error
        excluded = set(query.exclude_item_ids)
        popular_pool = [cand(i, 100.0 - n, Source.POPULAR) for n, i in enumerate(reversed(ITEMS))]
        if query.sources == (Source.POPULAR,):
            pool = popular_pool
        elif query.user_id.startswith(self.known_prefix):
            pool = [cand(i, 1.0 - n / 1000, Source.ANN) for n, i in enumerate(ITEMS)]
        else:
            pool = []
        out = [c for c in pool if c.item_id not in excluded][: query.k]
        popular = None
        if self.answers_popular and query.popular_k:
            rows = [c for c in popular_pool if c.item_id not in excluded][: query.popular_k]
            popular = CandidateTable.from_rows(rows)
        return Retrieval(CandidateTable.from_rows(out), "books-retrieval", "1", popular=popular)


def planted_score(user_id: str, item_id: str) -> float:
    """A deterministic score that disagrees with retrieval order."""
    return float((int(item_id[1:]) * 37 + len(user_id)) % 101)


@dataclass
class FakeRankers:
    """`replicas` ranker replicas; `behaviour[r]` decides what replica r does with a query:
    return None to answer with `versions[r]`, or raise."""

    versions: list[str]
    behaviour: dict[int, Callable[[RankQuery], None]] = field(default_factory=dict)
    delay_s: dict[int, float] = field(default_factory=dict)
    calls: list[tuple[int, RankQuery]] = field(default_factory=list)
    cancelled: int = 0

    @property
    def replicas(self) -> int:
        return len(self.versions)

    async def rank(self, query: RankQuery, *, replica: int, timeout: float) -> Ranked:
        r = replica % len(self.versions)
        self.calls.append((r, query))
        try:
            if self.delay_s.get(r):
                await asyncio.sleep(self.delay_s[r])
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if r in self.behaviour:
            self.behaviour[r](query)
        version = self.versions[r]
        if query.model_version and query.model_version != version:
            raise UpstreamError("NOT_FOUND", f"version {query.model_version} not loaded")
        offset = 1000.0 * int(version)  # scores of different versions are not comparable
        scores = [offset + planted_score(query.user_id, i) for i in query.item_ids]
        return Ranked(scores, query.model_name, version)


def raise_code(code: str) -> Callable[[RankQuery], None]:
    def behaviour(query: RankQuery) -> None:
        raise UpstreamError(code, "test")

    return behaviour


def raise_code_detail(code: str, detail: str) -> Callable[[RankQuery], None]:
    def behaviour(query: RankQuery) -> None:
        raise UpstreamError(code, detail)

    return behaviour


CONFIG = PipelineConfig(
    retrieval_candidates=100, popular_candidates=10, shards=4, min_shard_size=8, margin_s=0.002
)


def run(pipeline: Pipeline, query: RecommendQuery, timeout: float = 2.0):  # type: ignore[no-untyped-def]
    return asyncio.run(pipeline.recommend(query, timeout=timeout))


# --- pure helpers -----------------------------------------------------------------------------


def test_merge_keeps_first_occurrence_and_drops_excluded() -> None:
    a = [cand("i1", 5.0), cand("i2", 4.0)]
    b = [cand("i2", 9.0, Source.POPULAR), cand("i3", 1.0, Source.POPULAR), cand("i4")]
    tables = [CandidateTable.from_rows(a), CandidateTable.from_rows(b)]
    merged = merge_candidates(tables, exclude=frozenset({"i4"})).rows()
    assert [c.item_id for c in merged] == ["i1", "i2", "i3"]
    assert merged[1].source == Source.ANN and merged[1].score == 4.0


@pytest.mark.parametrize(
    ("n", "shards", "min_size", "expected_count"),
    [(0, 4, 8, 0), (5, 4, 8, 1), (100, 4, 8, 4), (100, 4, 40, 2), (501, 3, 1, 3), (7, 10, 1, 7)],
)
def test_split_shards_covers_every_item_once(
    n: int, shards: int, min_size: int, expected_count: int
) -> None:
    ranges = split_shards(n, shards, min_size)
    assert len(ranges) == expected_count
    covered = [i for lo, hi in ranges for i in range(lo, hi)]
    assert covered == list(range(n))
    if ranges:
        sizes = [hi - lo for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= max(sizes) // 2 + 1


def test_top_k_puts_ranked_first_then_unranked_in_retrieval_order() -> None:
    cands = CandidateTable.from_rows([cand(f"i{j}", 10.0 - j) for j in range(6)])
    nan = float("nan")  # unranked
    scores = np.array([0.1, nan, 0.9, nan, 0.5, 0.9])
    out = top_k(cands, scores, 5)
    assert [c.item_id for c in out] == ["i2", "i5", "i4", "i0", "i1"]
    assert out[0].score == pytest.approx(0.9) and out[0].ranked
    # Unranked items carry no score: retrieval scores of different sources are not comparable.
    assert out[4].score == 0.0 and not out[4].ranked
    assert top_k(cands, scores, 2) == out[:2]


def test_top_k_never_orders_by_a_nan() -> None:
    cands = CandidateTable.from_rows([cand(f"i{j}", 10.0 - j) for j in range(5)])
    nan, inf = float("nan"), float("inf")
    out = top_k(cands, np.array([0.1, nan, 0.3, inf, 0.2]), 5)
    assert [c.item_id for c in out] == ["i2", "i4", "i0", "i1", "i3"]
    assert [c.ranked for c in out] == [True, True, True, False, False]


def test_choose_version_prefers_most_shards_then_newest() -> None:
    assert choose_version(["3", "3", "4"]) == "3"
    assert choose_version(["3", "4"]) == "4"
    assert choose_version(["10", "9"]) == "10"


def test_retry_budget_limits_retries_to_a_fraction_of_calls() -> None:
    budget = RetryBudget(ratio=0.1, burst=2)
    assert budget.try_spend() and budget.try_spend() and not budget.try_spend()
    for _ in range(9):
        budget.record_call()
    assert not budget.try_spend()
    budget.record_call()
    assert budget.try_spend()


# --- the pipeline -----------------------------------------------------------------------------


def test_ranks_every_candidate_in_shards_and_returns_top_k() -> None:
    rankers = FakeRankers(["1", "1"])
    pipeline = Pipeline(FakeRetriever(), rankers, CONFIG)
    result = run(pipeline, RecommendQuery("u7", "books", 10))
    assert not result.degraded and result.ranked
    # 100 ANN candidates + 10 popular ones from the other end of the catalogue.
    ranked_ids = [i for _, q in rankers.calls for i in q.item_ids]
    assert len(ranked_ids) == 110 and len(set(ranked_ids)) == 110
    assert len(rankers.calls) == 4 and {r for r, _ in rankers.calls} == {0, 1}
    expected = sorted(ranked_ids, key=lambda i: (-planted_score("u7", i), ranked_ids.index(i)))
    assert [c.item_id for c in result.items] == expected[:10]
    assert ("books-ranker", "1") in result.model_versions
    assert ("books-retrieval", "1") in result.model_versions
    assert all(c.title == f"title {c.item_id}" for c in result.items)


def test_seen_items_are_excluded_and_passed_to_retrieval() -> None:
    retriever = FakeRetriever()
    pipeline = Pipeline(retriever, FakeRankers(["1"]), CONFIG)
    recent = ("i0", "i5", "i199")
    result = run(
        pipeline, RecommendQuery("u1", "books", 100, exclude_seen=True, recent_item_ids=recent)
    )
    assert not {c.item_id for c in result.items} & set(recent)
    assert all(q.exclude_seen and set(recent) <= set(q.exclude_item_ids) for q in retriever.calls)
    assert all(q.history_item_ids == recent for q in retriever.calls)


def test_unknown_user_gets_retrieval_order_without_ranking() -> None:
    rankers = FakeRankers(["1"])
    result = run(Pipeline(FakeRetriever(), rankers, CONFIG), RecommendQuery("x9", "books", 5))
    assert rankers.calls == []
    assert not result.degraded
    assert [c.source for c in result.items] == [Source.POPULAR] * 5
    assert [c.item_id for c in result.items] == ["i199", "i198", "i197", "i196", "i195"]


def test_ranking_unavailable_degrades_to_retrieval_order() -> None:
    rankers = FakeRankers(
        ["1", "1"], behaviour={0: raise_code("UNAVAILABLE"), 1: raise_code("UNAVAILABLE")}
    )
    result = run(Pipeline(FakeRetriever(), rankers, CONFIG), RecommendQuery("u1", "books", 5))
    assert [d.reason for d in result.degradations] == [Reason.RANKING_UNAVAILABLE]
    assert "UNAVAILABLE" in result.degradations[0].detail
    assert [c.item_id for c in result.items] == ITEMS[:5]
    assert not result.ranked


def test_ranking_late_degrades_within_the_deadline() -> None:
    rankers = FakeRankers(["1"], delay_s={0: 5.0})
    pipeline = Pipeline(FakeRetriever(), rankers, CONFIG)

    async def timed() -> tuple[float, object]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await pipeline.recommend(RecommendQuery("u1", "books", 5), timeout=0.3)
        return loop.time() - start, result

    elapsed, result = asyncio.run(timed())
    assert elapsed < 0.3 + 0.1  # the deadline, plus scheduling slack on a busy machine
    assert [d.reason for d in result.degradations] == [Reason.RANKING_DEADLINE]  # type: ignore[attr-defined]
    assert [c.item_id for c in result.items] == ITEMS[:5]  # type: ignore[attr-defined]
    assert rankers.cancelled == 4  # the late calls were cancelled, not left running


def test_refused_shards_are_retried_on_another_replica() -> None:
    rankers = FakeRankers(["1", "1"], behaviour={0: raise_code("UNAVAILABLE")})
    result = run(Pipeline(FakeRetriever(), rankers, CONFIG), RecommendQuery("u1", "books", 10))
    assert not result.degraded and result.ranked
    assert [r for r, _ in rankers.calls].count(1) == 4


def test_a_failed_shard_that_cannot_be_retried_is_partial() -> None:
    rankers = FakeRankers(["1", "1"], behaviour={0: raise_code("INTERNAL")})
    result = run(Pipeline(FakeRetriever(), rankers, CONFIG), RecommendQuery("u1", "books", 110))
    assert [d.reason for d in result.degradations] == [Reason.RANKING_PARTIAL]
    assert "2 of 4" in result.degradations[0].detail
    # Ranked candidates (replica 1 scored shards 1 and 3) come first, the rest in retrieval order.
    ranked = {i for r, q in rankers.calls if r == 1 for i in q.item_ids}
    assert {c.item_id for c in result.items[: len(ranked)]} == ranked
    assert len({c.item_id for c in result.items}) == 110


def test_retries_stop_when_the_budget_is_spent() -> None:
    rankers = FakeRankers(["1", "1"], behaviour={0: raise_code("UNAVAILABLE")})
    pipeline = Pipeline(FakeRetriever(), rankers, CONFIG, budget=RetryBudget(ratio=0.0, burst=1))
    result = run(pipeline, RecommendQuery("u1", "books", 10))
    assert [d.reason for d in result.degradations] == [Reason.RANKING_PARTIAL]
    assert len(rankers.calls) == 5  # 4 shards, one retry


def test_version_skew_never_mixes_versions() -> None:
    # Replica 0 runs version 1, replica 1 version 2; shards alternate between them.
    rankers = FakeRankers(["1", "2"])
    config = PipelineConfig(
        retrieval_candidates=100, popular_candidates=0, shards=3, min_shard_size=8
    )
    result = run(Pipeline(FakeRetriever(), rankers, config), RecommendQuery("u1", "books", 100))
    # Shards 0 and 2 went to replica 0 (v1), shard 1 to replica 1 (v2): v1 wins and shard 1 is
    # re-sent pinned to v1.
    assert not result.degraded
    assert ("books-ranker", "1") in result.model_versions
    assert all(1000 <= c.score < 2000 for c in result.items)
    pinned = [q for _, q in rankers.calls if q.model_version]
    assert pinned and all(q.model_version == "1" for q in pinned)


def test_version_skew_without_a_replica_of_the_chosen_version_is_partial() -> None:
    def gone_when_pinned(query: RankQuery) -> None:
        if query.model_version:
            raise UpstreamError("UNAVAILABLE", "replica went away")

    # The only version-1 replica goes away before the re-sent shard reaches it.
    rankers = FakeRankers(["1", "2"], behaviour={0: gone_when_pinned})
    config = PipelineConfig(
        retrieval_candidates=100,
        popular_candidates=0,
        shards=3,
        min_shard_size=8,
        max_rank_attempts=1,
    )
    result = run(Pipeline(FakeRetriever(), rankers, config), RecommendQuery("u1", "books", 100))
    assert [d.reason for d in result.degradations] == [Reason.RANKING_PARTIAL]
    scored = [c for c in result.items if c.score >= 1000]
    assert scored and all(c.score < 2000 for c in scored)  # only version 1 scores


def test_retrieval_down_falls_back_to_cached_popular_items_and_still_ranks() -> None:
    popular = PopularItems()
    popular.set(
        "books",
        CandidateTable.from_rows([cand(f"i{j}", 50.0 - j, Source.POPULAR) for j in range(30)]),
    )
    rankers = FakeRankers(["1"])
    retriever = FakeRetriever(error=UpstreamError("UNAVAILABLE", "connection refused"))
    pipeline = Pipeline(retriever, rankers, CONFIG, popular=popular)
    result = run(
        pipeline, RecommendQuery("u1", "books", 5, exclude_seen=True, recent_item_ids=("i3",))
    )
    assert [d.reason for d in result.degradations] == [Reason.RETRIEVAL_UNAVAILABLE]
    assert result.ranked
    ids = [c.item_id for c in result.items]
    assert "i3" not in ids
    expected = sorted((f"i{j}" for j in range(30) if j != 3), key=lambda i: -planted_score("u1", i))
    assert ids == expected[:5]


def test_retrieval_and_ranking_down_is_unavailable_even_with_a_cache() -> None:
    popular = PopularItems()
    popular.set(
        "books",
        CandidateTable.from_rows([cand(f"i{j}", 50.0 - j, Source.POPULAR) for j in range(30)]),
    )
    rankers = FakeRankers(["1"], behaviour={0: raise_code("UNAVAILABLE")})
    retriever = FakeRetriever(error=UpstreamError("UNAVAILABLE"))
    with pytest.raises(PipelineUnavailable, match="both unavailable"):
        run(Pipeline(retriever, rankers, CONFIG, popular=popular), RecommendQuery("u1", "books", 3))


def test_nothing_to_fall_back_on_is_unavailable() -> None:
    retriever = FakeRetriever(error=UpstreamError("UNAVAILABLE"))
    with pytest.raises(PipelineUnavailable):
        run(Pipeline(retriever, FakeRankers(["1"]), CONFIG), RecommendQuery("u1", "books", 3))
    # The retrieval call is retried once (UNAVAILABLE); no popular call follows a failed one.
    assert len(retriever.calls) == 2


def test_cancelling_the_request_cancels_the_fan_out() -> None:
    rankers = FakeRankers(["1", "1"], delay_s={0: 10.0, 1: 10.0})
    pipeline = Pipeline(FakeRetriever(), rankers, CONFIG)

    async def cancel_midway() -> None:
        task = asyncio.create_task(pipeline.recommend(RecommendQuery("u1", "books", 5), timeout=20))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert len(rankers.calls) == 4 and rankers.cancelled == 4


def test_retrieval_is_asked_for_at_least_k_candidates() -> None:
    retriever = FakeRetriever()
    config = PipelineConfig(retrieval_candidates=5, popular_candidates=0, min_shard_size=1)
    result = run(Pipeline(retriever, FakeRankers(["1"]), config), RecommendQuery("u1", "books", 20))
    assert retriever.calls[0].k == 20
    assert len(result.items) == 20


SIZE_ERROR = "ranker: Received message larger than max (11000000 vs. 4194304)"


def test_a_call_that_failed_for_its_own_size_is_never_retried() -> None:
    rankers = FakeRankers(
        ["1", "1"], behaviour={0: raise_code_detail("RESOURCE_EXHAUSTED", SIZE_ERROR)}
    )
    result = run(Pipeline(FakeRetriever(), rankers, CONFIG), RecommendQuery("u1", "books", 10))
    assert [d.reason for d in result.degradations] == [Reason.RANKING_PARTIAL]
    assert len(rankers.calls) == 4  # no shard was sent again
    retriever = FakeRetriever(error=UpstreamError("RESOURCE_EXHAUSTED", SIZE_ERROR))
    with pytest.raises(PipelineUnavailable):
        run(Pipeline(retriever, FakeRankers(["1"]), CONFIG), RecommendQuery("u1", "books", 3))
    assert len(retriever.calls) == 1  # not repeated, and no popular call after it


def test_a_full_queue_is_still_retried() -> None:
    rankers = FakeRankers(["1", "1"], behaviour={0: raise_code("RESOURCE_EXHAUSTED")})
    result = run(Pipeline(FakeRetriever(), rankers, CONFIG), RecommendQuery("u1", "books", 10))
    assert not result.degraded and len(rankers.calls) == 6


def test_upstream_details_are_cut() -> None:
    error = UpstreamError("NOT_FOUND", "unknown user id: " + "x" * 20_000)
    assert len(error.detail) < 300 and len(str(error)) < 300


def test_nan_scores_are_unranked_and_flagged() -> None:
    class NanRankers(FakeRankers):
        async def rank(self, query: RankQuery, *, replica: int, timeout: float) -> Ranked:
            ranked = await super().rank(query, replica=replica, timeout=timeout)
            nan = float("nan")
            scores = [
                nan if int(i[1:]) % 2 else s
                for i, s in zip(query.item_ids, ranked.scores, strict=True)
            ]
            return Ranked(scores, ranked.model_name, ranked.model_version)

    result = run(
        Pipeline(FakeRetriever(), NanRankers(["1"]), CONFIG), RecommendQuery("u1", "books", 100)
    )
    assert [d.reason for d in result.degradations] == [Reason.RANKING_INVALID_SCORES]
    assert "55 of 110" in result.degradations[0].detail
    ranked = [c for c in result.items if c.ranked]
    assert len(ranked) == 55 and all(int(c.item_id[1:]) % 2 == 0 for c in ranked)
    assert [c.score for c in ranked] == sorted((c.score for c in ranked), reverse=True)
    assert result.items[:55] == ranked  # every NaN-scored item follows the ranked ones


def unknown_user(query: RankQuery) -> None:
    raise UpstreamError("NOT_FOUND", f"ranker: unknown user id: {query.user_id!r} (model x)")


def test_unknown_user_with_retrieval_down_gets_cached_popular_items() -> None:
    popular = PopularItems()
    popular.set(
        "books",
        CandidateTable.from_rows([cand(f"i{j}", 50.0 - j, Source.POPULAR) for j in range(30)]),
    )
    rankers = FakeRankers(["1"], behaviour={0: unknown_user})
    retriever = FakeRetriever(error=UpstreamError("UNAVAILABLE", "connection refused"))
    result = run(
        Pipeline(retriever, rankers, CONFIG, popular=popular), RecommendQuery("new", "books", 5)
    )
    assert [d.reason for d in result.degradations] == [
        Reason.RETRIEVAL_UNAVAILABLE,
        Reason.UNKNOWN_USER,
    ]
    assert [c.item_id for c in result.items] == ["i0", "i1", "i2", "i3", "i4"]
    assert not any(c.ranked for c in result.items)


def test_unknown_user_to_the_ranker_keeps_retrieval_order() -> None:
    rankers = FakeRankers(["1"], behaviour={0: unknown_user})
    result = run(Pipeline(FakeRetriever(), rankers, CONFIG), RecommendQuery("u1", "books", 5))
    assert [d.reason for d in result.degradations] == [Reason.UNKNOWN_USER]
    assert [c.item_id for c in result.items] == ITEMS[:5]


def test_a_deadline_too_short_for_the_pipeline_is_never_unavailable() -> None:
    class SlowRetriever(FakeRetriever):
        async def retrieve(self, query: RetrieveQuery, *, timeout: float) -> Retrieval:
            await asyncio.sleep(0.05)
            return await super().retrieve(query, timeout=timeout)

    popular = PopularItems()
    popular.set(
        "books",
        CandidateTable.from_rows([cand(f"i{j}", 50.0 - j, Source.POPULAR) for j in range(30)]),
    )
    rankers = FakeRankers(["1"], delay_s={0: 0.05})
    pipeline = Pipeline(SlowRetriever(), rankers, CONFIG, popular=popular)
    result = run(pipeline, RecommendQuery("u1", "books", 5), timeout=0.012)
    assert [d.reason for d in result.degradations] == [
        Reason.RETRIEVAL_UNAVAILABLE,
        Reason.RANKING_DEADLINE,
    ]
    assert [c.item_id for c in result.items] == ["i0", "i1", "i2", "i3", "i4"]
    # Nothing cached: the deadline, not UNAVAILABLE.
    with pytest.raises(PipelineDeadline):
        run(Pipeline(SlowRetriever(), rankers, CONFIG), RecommendQuery("u1", "books", 5), 0.012)


def test_a_stalled_replica_is_hedged_around() -> None:
    rankers = FakeRankers(["1", "1"], delay_s={0: 5.0})
    config = PipelineConfig(
        retrieval_candidates=100, popular_candidates=10, shards=4, min_shard_size=8, hedge_s=0.05
    )
    pipeline = Pipeline(FakeRetriever(), rankers, config)

    async def timed() -> tuple[float, object]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await pipeline.recommend(RecommendQuery("u1", "books", 10), timeout=2.0)
        return loop.time() - start, result

    elapsed, result = asyncio.run(timed())
    assert not result.degraded and result.ranked  # type: ignore[attr-defined]
    assert elapsed < 1.0  # far from the 2 s deadline: the stalled replica cost one hedge delay
    # Shards 0 and 2 went to the stalled replica, were sent again to replica 1 after 50 ms, and
    # the stalled calls were cancelled.
    assert [r for r, _ in rankers.calls] == [0, 1, 0, 1, 1, 1]
    assert rankers.cancelled == 2


def test_no_hedge_for_a_single_replica_or_a_fast_answer() -> None:
    config = PipelineConfig(
        retrieval_candidates=100, popular_candidates=10, min_shard_size=32, hedge_s=0.05
    )
    rankers = FakeRankers(["1", "1"])
    run(Pipeline(FakeRetriever(), rankers, config), RecommendQuery("u1", "books", 10))
    assert len(rankers.calls) == 3  # 110 candidates in shards of at least 32, none hedged
    slow_single = FakeRankers(["1"], delay_s={0: 0.2})
    result = run(Pipeline(FakeRetriever(), slow_single, config), RecommendQuery("u1", "books", 10))
    assert not result.degraded and len(slow_single.calls) == 3


def test_one_retrieval_call_answers_both_lists_where_the_server_can() -> None:
    """A retriever that answers `popular_k` gets one call; one that does not (a server older
    than the field) a second, popular-only call: the merged candidates are the same."""
    query = RecommendQuery("u1", "books", 10, recent_item_ids=("i5",))
    merged = []
    for answers_popular, calls in ((True, 1), (False, 2)):
        retriever = FakeRetriever(answers_popular=answers_popular)
        rankers = FakeRankers(["1"])
        result = run(Pipeline(retriever, rankers, CONFIG), query)
        assert not result.degraded and len(retriever.calls) == calls
        assert retriever.calls[0].popular_k == CONFIG.popular_candidates
        assert retriever.calls[0].exclude_item_ids == ("i5",)
        ranked = sorted(i for _, q in rankers.calls for i in q.item_ids)
        merged.append(ranked)
    # 100 ANN candidates and the 10 popular ones from the other end of the catalogue.
    assert merged[0] == merged[1] and len(merged[0]) == 110 and "i199" in merged[0]
