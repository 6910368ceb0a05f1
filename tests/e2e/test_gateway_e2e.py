"""The whole stack as processes on loopback: retrieval, two ranker replicas and the gateway over a
tiny model repository with planted tastes, driven by real gRPC clients.

The tests share one stack and run in file order: the answers first, then a rolling update of the
rankers and a model version rollout under load, then stopping rankers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from devtools.stack import LoadGenerator, Stack, StackOptions
from devtools.tiny_models import TinyModel, make_tiny_model, publish_tiny_model
from gateway.pipeline import PipelineConfig, RecommendQuery
from offline.local import local_pipeline
from recsys.v1 import (
    common_pb2,
    ranking_pb2,
    ranking_pb2_grpc,
    recommendation_pb2,
    recommendation_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

Reason = recommendation_pb2.DegradationReason
# Degradations a replica that is starting, draining or slow can cause.
RANKING_REASONS = {
    Reason.DEGRADATION_REASON_RANKING_UNAVAILABLE,
    Reason.DEGRADATION_REASON_RANKING_DEADLINE,
    Reason.DEGRADATION_REASON_RANKING_PARTIAL,
}
OPTIONS = StackOptions()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repo")


@pytest.fixture(scope="module")
def model(repo: Path) -> TinyModel:
    return publish_tiny_model(repo, make_tiny_model(n_items=300))


@pytest.fixture(scope="module")
def stack(
    repo: Path, model: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    s = Stack(repo, tmp_path_factory.mktemp("logs"), OPTIONS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[recommendation_pb2_grpc.RecommendationServiceStub]:
    with grpc.insecure_channel(stack.gateway.address) as channel:
        yield recommendation_pb2_grpc.RecommendationServiceStub(channel)


def recommend(
    stub: recommendation_pb2_grpc.RecommendationServiceStub, timeout: float = 10, **fields: object
) -> recommendation_pb2.RecommendResponse:
    fields.setdefault("domain", "books")
    fields.setdefault("k", 10)
    return stub.Recommend(recommendation_pb2.RecommendRequest(**fields), timeout=timeout)  # type: ignore[arg-type]


def test_items_are_distinct_unseen_and_in_the_order_of_direct_scoring(
    stack: Stack, gateway: recommendation_pb2_grpc.RecommendationServiceStub, model: TinyModel
) -> None:
    user, recent = "u5", ["i1", "i2"]
    reply = recommend(gateway, user_id=user, k=10, exclude_seen=True, recent_item_ids=recent)
    assert not reply.degraded, reply.degradations
    ids = [i.item_id for i in reply.items]
    seen = {model.item_ids[j] for j in model.seen[model.user_ids.index(user)]}
    assert len(ids) == 10 == len(set(ids))
    assert not set(ids) & (seen | set(recent))

    # The same candidates, asked of retrieval and scored on one ranker directly.
    candidates: list[str] = []
    with grpc.insecure_channel(stack.retrieval.address) as channel:
        retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        for k, sources in (
            (OPTIONS.retrieval_candidates, [1, 3, 4]),
            (OPTIONS.popular_candidates, [common_pb2.CANDIDATE_SOURCE_POPULAR]),
        ):
            answer = retrieval.Retrieve(
                retrieval_pb2.RetrieveRequest(
                    user_id=user,
                    domain="books",
                    k=k,
                    exclude_seen=True,
                    exclude_item_ids=recent,
                    history_item_ids=recent,
                    sources=sources,  # type: ignore[arg-type]
                ),
                timeout=10,
            )
            candidates += [c.item_id for c in answer.candidates if c.item_id not in candidates]
    with grpc.insecure_channel(stack.rankers[0].address) as channel:
        ranked = ranking_pb2_grpc.RankingServiceStub(channel).Rank(
            ranking_pb2.RankRequest(model_name="books-ranker", user_id=user, item_ids=candidates),
            timeout=10,
        )
    order = np.argsort(-np.asarray(ranked.scores), kind="stable")[:10]
    assert ids == [candidates[j] for j in order]
    assert [i.score for i in reply.items] == pytest.approx([ranked.scores[j] for j in order])
    assert all(i.title == model.titles[model.item_ids.index(i.item_id)] for i in reply.items)
    versions = {(m.model_name, m.model_version) for m in reply.model_versions}
    assert versions == {("books-retrieval", "1"), ("books-ranker", "1")}


def test_top_items_match_the_planted_tastes(
    gateway: recommendation_pb2_grpc.RecommendationServiceStub, model: TinyModel
) -> None:
    for user in ("u0", "u1", "u2", "u3", "u17"):
        reply = recommend(gateway, user_id=user, k=10, exclude_seen=True)
        assert not reply.degraded
        taste = model.user_cluster[model.user_ids.index(user)]
        clusters = [model.item_cluster[model.item_ids.index(i.item_id)] for i in reply.items]
        assert clusters == [taste] * 10


def test_cold_start_user_gets_transferred_recommendations(
    gateway: recommendation_pb2_grpc.RecommendationServiceStub, model: TinyModel
) -> None:
    reply = recommend(gateway, user_id="c3", k=10, exclude_seen=True)
    assert not reply.degraded
    sources = [i.source for i in reply.items]
    assert sources.count(common_pb2.CANDIDATE_SOURCE_TRANSFER) >= 8
    taste = model.user_cluster[model.user_ids.index("c3")]
    clusters = [model.item_cluster[model.item_ids.index(i.item_id)] for i in reply.items]
    assert clusters.count(taste) >= 8
    # Not the popular list that an unknown user gets.
    stranger = recommend(gateway, user_id="nobody-at-all", k=10)
    assert {i.source for i in stranger.items} == {common_pb2.CANDIDATE_SOURCE_POPULAR}
    assert [i.item_id for i in reply.items] != [i.item_id for i in stranger.items]


@pytest.mark.parametrize("fields", [{"user_id": ""}, {"domain": "music"}, {"k": 0}, {"k": 1000}])
def test_bad_input_is_invalid_argument(
    gateway: recommendation_pb2_grpc.RecommendationServiceStub, fields: dict[str, object]
) -> None:
    fields.setdefault("user_id", "u1")
    with pytest.raises(grpc.RpcError) as info:
        recommend(gateway, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_short_caller_deadline_is_honoured_end_to_end(
    gateway: recommendation_pb2_grpc.RecommendationServiceStub,
) -> None:
    for deadline in (0.005, 0.05, 0.15):
        start = time.monotonic()
        try:
            reply = recommend(gateway, user_id="u8", timeout=deadline)
            assert reply.items  # answered in time, maybe degraded
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < deadline + 0.1


def test_offline_pipeline_gives_the_networked_answers(
    gateway: recommendation_pb2_grpc.RecommendationServiceStub, repo: Path
) -> None:
    config = PipelineConfig(
        retrieval_candidates=OPTIONS.retrieval_candidates,
        popular_candidates=OPTIONS.popular_candidates,
        shards=OPTIONS.ranker_shards,
        min_shard_size=OPTIONS.min_shard_size,
    )
    pipeline = local_pipeline(repo, config)
    for user in ("u4", "u9", "c1", "stranger"):
        online = recommend(gateway, user_id=user, k=15, exclude_seen=True)
        offline = asyncio.run(
            pipeline.recommend(RecommendQuery(user, "books", 15, exclude_seen=True), timeout=60)
        )
        assert [i.item_id for i in online.items] == [c.item_id for c in offline.items]
        assert [i.score for i in online.items] == pytest.approx([c.score for c in offline.items])
        assert [i.source for i in online.items] == [int(c.source) for c in offline.items]


def test_rolling_update_and_model_rollout_under_load_fail_no_request(
    stack: Stack, repo: Path
) -> None:
    with LoadGenerator(stack.gateway.address, concurrency=4) as load:
        time.sleep(1.0)
        # Replace the replicas one at a time, as a Deployment's rolling update does.
        stack.start_ranker(2)
        assert stack.stop_ranker(0) == 0
        stack.start_ranker(3)
        assert stack.stop_ranker(1) == 0
        # A new model version, picked up by retrieval and the rankers by polling.
        newer = publish_tiny_model(repo, make_tiny_model(n_items=300, seed=7))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            recent = load.outcomes[-8:]
            if recent and all(o.ranker_versions == (str(newer.version),) for o in recent):
                break
            time.sleep(0.2)
        time.sleep(0.5)
    outcomes = load.outcomes
    assert len(outcomes) > 20
    assert load.failures() == []
    assert outcomes[-1].ranker_versions == (str(newer.version),)
    # Every answer was ranked by exactly one version.
    assert all(len(o.ranker_versions) <= 1 for o in outcomes)
    # How many answers the swaps degrade depends on how busy the machine is (a replica that is
    # starting or draining answers late): bench-rollout measures that share on a quiet machine.
    # What holds under any load: only ranking degrades (retrieval never went away), and answers
    # were ranked before, during and after the rollout.
    assert {r for o in outcomes for r in o.reasons} <= RANKING_REASONS
    assert sum(not o.degraded for o in outcomes) >= 3


def test_stopping_one_ranker_under_load_fails_no_request(stack: Stack) -> None:
    # Two replicas serve whether or not the rolling update above ran (it replaces both).
    first, *others = stack.running_slots()
    assert len(others) == 1
    with LoadGenerator(stack.gateway.address, concurrency=4) as load:
        time.sleep(1.0)
        assert stack.stop_ranker(first) == 0
        time.sleep(1.5)
    assert load.count() > 10
    assert load.failures() == []
    # Only ranking degrades, and the surviving replica keeps ranking (how often an answer is
    # partial while the replica drains depends on the machine's load: bench-rollout measures it).
    assert {r for o in load.outcomes for r in o.reasons} <= RANKING_REASONS
    assert sum(not o.degraded for o in load.outcomes[len(load.outcomes) // 2 :]) >= 1


def test_all_rankers_down_gives_degraded_answers_within_the_deadline(
    stack: Stack, gateway: recommendation_pb2_grpc.RecommendationServiceStub
) -> None:
    running = stack.running_slots()
    assert running, "a ranker serves before they all stop"
    for slot in running:
        assert stack.stop_ranker(slot) == 0
    for user in ("u1", "u2", "c0"):
        start = time.monotonic()
        reply = recommend(gateway, user_id=user, timeout=1.0)
        assert time.monotonic() - start < 1.0
        assert reply.degraded
        assert {d.reason for d in reply.degradations} <= {
            Reason.DEGRADATION_REASON_RANKING_UNAVAILABLE,
            Reason.DEGRADATION_REASON_RANKING_DEADLINE,
        }
        assert len(reply.items) == 10


def test_services_drain_and_exit_0_on_sigterm(stack: Stack) -> None:
    assert stack.gateway.terminate(30) == 0
    assert stack.retrieval.terminate(30) == 0
    assert "Shutdown signal received" in stack.gateway.log()
    assert "Shutdown signal received" in stack.retrieval.log()
