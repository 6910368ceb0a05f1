"""The gateway over gRPC on loopback with a real retrieval server and no ranker listening:
degradation, fallbacks, bad input, health and metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from devtools.processes import REPO_ROOT, free_port, health_status, project_env
from devtools.tiny_models import TinyModel, make_tiny_model, publish_tiny_model
from gateway.config import GatewaySettings
from gateway.server import Gateway
from recsys.rpc.server import RpcServer
from recsys.rpc.settings import ServerSettings, SettingsConflict
from recsys.v1 import (
    common_pb2,
    ranking_pb2,
    ranking_pb2_grpc,
    recommendation_pb2,
    recommendation_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from serving.ranking.config import RankingSettings
from serving.ranking.server import build_server as build_ranker
from serving.ranking.server import create_manager
from serving.retrieval.config import RetrievalSettings
from serving.retrieval.server import build_manager, build_server
from tests.utils.servers import BackgroundServer

pytestmark = pytest.mark.integration

Reason = recommendation_pb2.DegradationReason
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repo")


@pytest.fixture(scope="module")
def model(repo: Path) -> TinyModel:
    return publish_tiny_model(repo, make_tiny_model())


@pytest.fixture(scope="module")
def retrieval(repo: Path, model: TinyModel) -> Iterator[BackgroundServer]:
    settings = RetrievalSettings(host="127.0.0.1", port=0, metrics_port=0, model_repository=repo)
    manager = build_manager(settings)
    manager.refresh()

    async def factory():  # type: ignore[no-untyped-def]
        return build_server(settings, manager)

    server = BackgroundServer(factory)
    yield server
    server.stop()


class GatewayUnderTest:
    def __init__(self, **overrides: object) -> None:
        dead = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
        fields: dict[str, object] = {
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": 0,
            "ranker_targets": dead,
            "retrieval_candidates": 100,
            "popular_candidates": 10,
            # Several shards per answer: what hedging, ejection and partial answers act on.
            "min_shard_size": 32,
        }
        fields.update(overrides)
        settings = GatewaySettings(**fields)  # type: ignore[arg-type]

        async def factory():  # type: ignore[no-untyped-def]
            # Channels belong to the event loop that creates them: the server's.
            self.gateway = Gateway(settings)
            server = self.gateway.build_server()
            await self.gateway.start()
            return server

        # The gateway sets its own health (whether answers are possible).
        self.server = BackgroundServer(factory, serving=False)
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = recommendation_pb2_grpc.RecommendationServiceStub(self.channel)

    def recommend(
        self, timeout: float = 10, **fields: object
    ) -> recommendation_pb2.RecommendResponse:
        fields.setdefault("domain", "books")
        fields.setdefault("k", 10)
        return self.stub.Recommend(recommendation_pb2.RecommendRequest(**fields), timeout=timeout)  # type: ignore[arg-type]

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.server.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode())

    def close(self) -> None:
        self.channel.close()
        self.server.run(self.gateway.close())
        self.server.stop()


@pytest.fixture(scope="module")
def gateway(retrieval: BackgroundServer) -> Iterator[GatewayUnderTest]:
    gw = GatewayUnderTest(retrieval_target=retrieval.address)
    yield gw
    gw.close()


def retrieve_directly(address: str, user_id: str, k: int) -> list[str]:
    """Retrieval's own order, seen items left out as the gateway does by default."""
    with grpc.insecure_channel(address) as channel:
        reply = retrieval_pb2_grpc.RetrievalServiceStub(channel).Retrieve(
            retrieval_pb2.RetrieveRequest(
                user_id=user_id,
                domain="books",
                k=k,
                exclude_seen=True,
                sources=[common_pb2.CANDIDATE_SOURCE_ANN, common_pb2.CANDIDATE_SOURCE_TRANSFER],
            ),
            timeout=10,
        )
    return [c.item_id for c in reply.candidates]


def test_rankers_down_gives_retrieval_order_degraded_and_fast(
    gateway: GatewayUnderTest, retrieval: BackgroundServer, model: TinyModel
) -> None:
    start = time.monotonic()
    reply = gateway.recommend(user_id="u3", k=10, timeout=5)
    elapsed = time.monotonic() - start
    assert elapsed < 2
    assert reply.degraded
    assert [d.reason for d in reply.degradations] == [Reason.DEGRADATION_REASON_RANKING_UNAVAILABLE]
    assert "UNAVAILABLE" in reply.degradations[0].detail
    assert [i.item_id for i in reply.items] == retrieve_directly(retrieval.address, "u3", 10)
    assert all(i.title for i in reply.items)
    assert ("books-retrieval", str(model.version)) in {
        (m.model_name, m.model_version) for m in reply.model_versions
    }
    text = gateway.metrics()
    assert 'recsys_gateway_degraded_total{reason="ranking_unavailable"}' in text
    assert 'recsys_gateway_upstream_errors_total{code="UNAVAILABLE",upstream="ranker"}' in text
    assert (
        'recsys_gateway_upstream_duration_seconds_count{method="Retrieve",upstream="retrieval"}'
        in text
    )
    assert 'recsys_gateway_stage_duration_seconds_count{stage="retrieval"}' in text


def test_unknown_user_gets_popular_items_without_degradation(
    gateway: GatewayUnderTest, model: TinyModel
) -> None:
    reply = gateway.recommend(user_id="someone-new", k=5)
    assert not reply.degraded
    assert {i.source for i in reply.items} == {common_pb2.CANDIDATE_SOURCE_POPULAR}
    # Unranked items carry no score (interaction counts are not comparable with model scores).
    assert all(i.score == 0.0 and not i.ranked for i in reply.items)
    assert reply.items[0].item_id == model.item_ids[int(model.popularity.argmax())]


def test_seen_items_are_filtered(gateway: GatewayUnderTest, model: TinyModel) -> None:
    row = model.user_ids.index("u4")
    seen = {model.item_ids[j] for j in model.seen[row]}
    first = [i.item_id for i in gateway.recommend(user_id="u4", k=20).items]
    recent = first[:2]
    reply = gateway.recommend(user_id="u4", k=20, exclude_seen=True, recent_item_ids=recent)
    ids = [i.item_id for i in reply.items]
    assert len(ids) == 20 == len(set(ids))
    assert not set(ids) & (seen | set(recent))


@pytest.mark.parametrize(
    "fields",
    [
        {"user_id": ""},
        {"domain": "music"},
        {"domain": ""},
        {"k": 0},
        {"k": 101},
        {"recent_item_ids": ["i1", ""]},
    ],
)
def test_bad_input_is_invalid_argument(
    gateway: GatewayUnderTest, fields: dict[str, object]
) -> None:
    fields.setdefault("user_id", "u1")
    with pytest.raises(grpc.RpcError) as info:
        gateway.recommend(**fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details()


LONG = "\u00e9" + "x" * 20_000  # over the metadata limit if an error repeated it whole


@pytest.mark.parametrize(
    "fields",
    [
        {"user_id": LONG},
        {"domain": LONG},
        {"recent_item_ids": ["i1", LONG]},
        {"recent_item_ids": ["i1"] * 1001},
    ],
)
def test_ids_and_recent_items_are_bounded(
    gateway: GatewayUnderTest, fields: dict[str, object]
) -> None:
    fields.setdefault("user_id", "u1")
    with pytest.raises(grpc.RpcError) as info:
        gateway.recommend(**fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert len(details) < 200 and "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" not in details


def test_everything_down_and_no_fallback_is_unavailable_quickly() -> None:
    gw = GatewayUnderTest(retrieval_target=f"127.0.0.1:{free_port()}")
    try:
        # Nothing to answer with: retrieval is down and no popular items are cached.
        assert health_status(gw.server.address) == NOT_SERVING
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            gw.recommend(user_id="u1", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 1.0
    finally:
        gw.close()


def test_retrieval_and_rankers_down_is_unavailable_quickly_despite_popular_items(
    repo: Path, model: TinyModel
) -> None:
    # The repository gives the gateway popular items, but with no upstream at all it says
    # UNAVAILABLE at once instead of answering unranked, unpersonalised items.
    gw = GatewayUnderTest(retrieval_target=f"127.0.0.1:{free_port()}", model_repository=repo)
    try:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            gw.recommend(user_id="u1", k=5, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "both unavailable" in (info.value.details() or "")
        assert time.monotonic() - start < 1.0
    finally:
        gw.close()


def test_retrieval_down_falls_back_to_popular_items_ranked(
    repo: Path, model: TinyModel, real_ranker: BackgroundServer
) -> None:
    gw = GatewayUnderTest(
        retrieval_target=f"127.0.0.1:{free_port()}",
        model_repository=repo,
        ranker_targets=real_ranker.address,
    )
    try:
        reply = gw.recommend(user_id="u1", k=5, timeout=5)
        assert reply.degraded
        assert [d.reason for d in reply.degradations] == [
            Reason.DEGRADATION_REASON_RETRIEVAL_UNAVAILABLE
        ]
        assert all(i.source == common_pb2.CANDIDATE_SOURCE_POPULAR for i in reply.items)
        # The popular items are ranked for the user: best model score first.
        ids = [i.item_id for i in reply.items]
        expected = model.scores("u1", ids)
        assert list(expected) == sorted(expected, reverse=True)
        assert 'recsys_gateway_degraded_total{reason="retrieval_unavailable"} ' in gw.metrics()
    finally:
        gw.close()


class SlowRanker(ranking_pb2_grpc.RankingServiceServicer):
    """A ranker that takes `delay_s` to answer and counts the calls cancelled while it waits."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.started = 0
        self.cancelled = 0

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        self.started += 1
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return ranking_pb2.RankResponse(
            scores=[0.0] * len(request.item_ids), model_name=request.model_name, model_version="1"
        )


def serve_ranker(servicer: ranking_pb2_grpc.RankingServiceServicer) -> BackgroundServer:
    """`servicer` as the RankingService of a kit server on a loopback port."""

    async def factory():  # type: ignore[no-untyped-def]
        return RpcServer(
            ServerSettings(host="127.0.0.1", port=0, metrics_port=0),
            service_names=["recsys.v1.RankingService"],
            register=lambda s: ranking_pb2_grpc.add_RankingServiceServicer_to_server(servicer, s),
        )

    return BackgroundServer(factory)


@pytest.fixture()
def slow_ranker() -> Iterator[tuple[BackgroundServer, SlowRanker]]:
    servicer = SlowRanker(delay_s=5.0)
    server = serve_ranker(servicer)
    yield server, servicer
    server.stop(grace=0)


class RepeatedScoresRanker(ranking_pb2_grpc.RankingServiceServicer):
    """A ranker from before RankRequest.packed_scores: it answers the repeated `scores` whatever
    the request asks, each item scored by its id's number (i17 -> 17)."""

    def __init__(self) -> None:
        self.asked_packed: list[bool] = []

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        self.asked_packed.append(request.packed_scores)
        return ranking_pb2.RankResponse(
            scores=[float(item[1:]) for item in request.item_ids],
            model_name=request.model_name,
            model_version="1",
        )


def test_an_older_ranker_that_answers_repeated_scores_still_ranks(
    retrieval: BackgroundServer,
) -> None:
    """The gateway asks for packed scores and reads the repeated field where a ranker answers
    that: the order is the ranker's (descending item number), with no degradation."""
    servicer = RepeatedScoresRanker()
    ranker = serve_ranker(servicer)
    gw = GatewayUnderTest(retrieval_target=retrieval.address, ranker_targets=ranker.address)
    try:
        reply = gw.recommend(user_id="u3", k=10)
        assert list(reply.degradations) == []
        numbers = [int(i.item_id[1:]) for i in reply.items]
        assert len(numbers) == 10 and numbers == sorted(numbers, reverse=True)
        assert servicer.asked_packed and all(servicer.asked_packed)
    finally:
        gw.close()
        ranker.stop(grace=0)


def test_late_rankers_give_retrieval_order_within_the_callers_deadline(
    retrieval: BackgroundServer, slow_ranker: tuple[BackgroundServer, SlowRanker]
) -> None:
    server, servicer = slow_ranker
    gw = GatewayUnderTest(retrieval_target=retrieval.address, ranker_targets=server.address)
    try:
        # An answer at all (not DEADLINE_EXCEEDED) means it came within the caller's 0.5 s,
        # while the rankers would have taken 5 s.
        reply = gw.recommend(user_id="u3", k=10, timeout=0.5)
        assert [d.reason for d in reply.degradations] == [
            Reason.DEGRADATION_REASON_RANKING_DEADLINE
        ]
        assert [i.item_id for i in reply.items] == retrieve_directly(retrieval.address, "u3", 10)
        # ~110 candidates in shards of at least 32: 3 calls, all cancelled, not left running.
        assert servicer.started == 3
        deadline = time.monotonic() + 5
        while servicer.cancelled < servicer.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert servicer.cancelled == servicer.started
    finally:
        gw.close()


def test_caller_cancellation_cancels_the_fan_out(
    retrieval: BackgroundServer, slow_ranker: tuple[BackgroundServer, SlowRanker]
) -> None:
    server, servicer = slow_ranker
    gw = GatewayUnderTest(retrieval_target=retrieval.address, ranker_targets=server.address)
    try:
        call = gw.stub.Recommend.future(
            recommendation_pb2.RecommendRequest(user_id="u3", domain="books", k=10), timeout=30
        )
        deadline = time.monotonic() + 10
        while servicer.started < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert servicer.started == 3
        call.cancel()
        while servicer.cancelled < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert servicer.cancelled == 3
    finally:
        gw.close()


def test_a_stalled_ranker_replica_costs_little(
    model: TinyModel,
    retrieval: BackgroundServer,
    slow_ranker: tuple[BackgroundServer, SlowRanker],
    real_ranker: BackgroundServer,
) -> None:
    # One real ranker and one whose handler blocks for 5 s (like a SIGSTOPped process: the
    # connection stays up, no answer comes).
    stalled, servicer = slow_ranker
    gw = GatewayUnderTest(
        retrieval_target=retrieval.address,
        ranker_targets=f"{real_ranker.address},{stalled.address}",
        ranker_hedge_ms=50,
        ranker_eject_s=5,
    )
    try:
        replies = [gw.recommend(user_id="u3", k=10, timeout=0.5) for _ in range(10)]
        # Without hedging every answer had a shard on the stalled replica and was partial at the
        # full deadline; with it, shards that replica holds go to the other one after 50 ms, and
        # the stalled replica is skipped for 5 s after its first slow call.
        assert [list(r.degradations) for r in replies] == [[]] * 10
        assert all(all(i.ranked for i in r.items) for r in replies)
        # Without ejection every call would put a shard on it (10 or more calls).
        assert servicer.started <= 4
        ids = [i.item_id for i in replies[-1].items]
        scores = model.scores("u3", ids)
        assert list(scores) == sorted(scores, reverse=True)
    finally:
        gw.close()


def test_health_says_whether_answers_are_possible(
    gateway: GatewayUnderTest, repo: Path, model: TinyModel
) -> None:
    assert health_status(gateway.server.address) == SERVING  # retrieval answers
    # Retrieval down, but popular items from the repository: answers are possible.
    gw = GatewayUnderTest(retrieval_target=f"127.0.0.1:{free_port()}", model_repository=repo)
    try:
        assert health_status(gw.server.address) == SERVING
    finally:
        gw.close()


def test_health_turns_serving_once_retrieval_answers(repo: Path, model: TinyModel) -> None:
    port = free_port()
    gw = GatewayUnderTest(retrieval_target=f"127.0.0.1:{port}")
    late: BackgroundServer | None = None
    try:
        assert health_status(gw.server.address) == NOT_SERVING
        settings = RetrievalSettings(
            host="127.0.0.1", port=port, metrics_port=0, model_repository=repo
        )
        manager = build_manager(settings)
        manager.refresh()

        async def factory():  # type: ignore[no-untyped-def]
            return build_server(settings, manager)

        late = BackgroundServer(factory)
        deadline = time.monotonic() + 10
        while health_status(gw.server.address) != SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health_status(gw.server.address) == SERVING
        assert gw.recommend(user_id="u3", k=5).items
    finally:
        gw.close()
        if late is not None:
            late.stop()


def test_settings_retrieval_cannot_serve_are_refused_at_start(retrieval: BackgroundServer) -> None:
    # The retrieval fixture allows k up to 1,000 (RETRIEVAL_MAX_K).
    with pytest.raises(SettingsConflict, match=r"retrieval_candidates .* = 2000"):
        GatewayUnderTest(retrieval_target=retrieval.address, retrieval_candidates=2000)


@pytest.fixture(scope="module")
def real_ranker(repo: Path, model: TinyModel) -> Iterator[BackgroundServer]:
    settings = RankingSettings(host="127.0.0.1", port=0, metrics_port=0, model_repository=repo)
    manager = create_manager(settings)

    async def factory():  # type: ignore[no-untyped-def]
        await manager.start()
        return build_ranker(settings, manager)

    ranker = BackgroundServer(factory)
    yield ranker
    ranker.run(manager.close())
    ranker.stop()


def test_unknown_user_with_retrieval_down_gets_popular_items(
    repo: Path, model: TinyModel, real_ranker: BackgroundServer
) -> None:
    gw = GatewayUnderTest(
        retrieval_target=f"127.0.0.1:{free_port()}",
        model_repository=repo,
        ranker_targets=real_ranker.address,
    )
    try:
        # The ranker answers NOT_FOUND for this user: not "ranking down".
        reply = gw.recommend(user_id="someone-new", k=5, timeout=5)
        assert [d.reason for d in reply.degradations] == [
            Reason.DEGRADATION_REASON_RETRIEVAL_UNAVAILABLE,
            Reason.DEGRADATION_REASON_UNKNOWN_USER,
        ]
        order = sorted(range(len(model.item_ids)), key=lambda j: (-model.popularity[j], j))
        assert [i.item_id for i in reply.items] == [model.item_ids[j] for j in order[:5]]
        assert not any(i.ranked for i in reply.items)
    finally:
        gw.close()


def test_a_deadline_too_short_for_the_pipeline_is_never_unavailable(
    retrieval: BackgroundServer, real_ranker: BackgroundServer
) -> None:
    gw = GatewayUnderTest(retrieval_target=retrieval.address, ranker_targets=real_ranker.address)
    try:
        codes = []
        for n in range(20):
            try:
                reply = gw.recommend(user_id="u3", k=10, timeout=0.011 + (n % 6) / 1000)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                continue
            codes.append(grpc.StatusCode.OK)
            # An answer that is not complete says why.
            assert reply.degraded == bool(reply.degradations)
        assert grpc.StatusCode.UNAVAILABLE not in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}
    finally:
        gw.close()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (
            ["--retrieval-candidates=2000"],
            "retrieval_candidates (env GATEWAY_RETRIEVAL_CANDIDATES)",
        ),
        (["--host=999.1.1.1"], "host (env GATEWAY_HOST, flag --host)"),
    ],
)
def test_gateway_process_refuses_bad_settings_with_exit_2_and_one_line(
    retrieval: BackgroundServer, flags: list[str], needle: str
) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "--port=0",
            "--metrics-port=0",
            f"--retrieval-target={retrieval.address}",
            f"--ranker-targets=127.0.0.1:{free_port()}",
            "--log-level=ERROR",
            *flags,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=project_env(),
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_seen_items_are_left_out_unless_asked_for(
    gateway: GatewayUnderTest, model: TinyModel
) -> None:
    row = model.user_ids.index("u4")
    seen = {model.item_ids[j] for j in model.seen[row]}
    viewed = gateway.recommend(user_id="u4", k=5).items[0].item_id
    # The client only says what was just viewed: by default it does not come back.
    reply = gateway.recommend(user_id="u4", k=5, recent_item_ids=[viewed])
    ids = [i.item_id for i in reply.items]
    assert viewed not in ids and not set(ids) & seen
    # Asked for explicitly, seen items may come back.
    everything = gateway.recommend(
        user_id="u4", k=100, exclude_seen=False, recent_item_ids=[viewed]
    )
    ids = [i.item_id for i in everything.items]
    assert viewed in ids and set(ids) & seen
