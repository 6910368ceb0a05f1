"""The retrieval service over gRPC on loopback: answers, status codes, version following, health,
metrics and the process entry point."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from devtools.processes import ServiceProcess, health_status
from devtools.tiny_models import (
    TinyModel,
    make_tiny_model,
    publish_corrupt_version,
    publish_tiny_model,
)
from gateway.clients import retrieval_from_reply
from recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from serving.retrieval.config import RetrievalSettings
from serving.retrieval.server import build_manager, build_server
from tests.utils.servers import BackgroundServer

pytestmark = pytest.mark.integration

ANN = common_pb2.CANDIDATE_SOURCE_ANN
POPULAR = common_pb2.CANDIDATE_SOURCE_POPULAR
TRANSFER = common_pb2.CANDIDATE_SOURCE_TRANSFER


class Retrieval:
    def __init__(self, repo: Path) -> None:
        self.settings = RetrievalSettings(
            host="127.0.0.1", port=0, metrics_port=0, model_repository=repo, max_k=200
        )
        self.manager = build_manager(self.settings)
        self.manager.refresh()

        async def factory():  # type: ignore[no-untyped-def]
            return build_server(self.settings, self.manager)

        self.server = BackgroundServer(factory)
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = retrieval_pb2_grpc.RetrievalServiceStub(self.channel)

    def retrieve(self, **fields: object) -> retrieval_pb2.RetrieveResponse:
        fields.setdefault("domain", "books")
        fields.setdefault("k", 10)
        return self.stub.Retrieve(retrieval_pb2.RetrieveRequest(**fields), timeout=10)  # type: ignore[arg-type]

    def close(self) -> None:
        self.channel.close()
        self.server.stop()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repo")


@pytest.fixture(scope="module")
def model(repo: Path) -> TinyModel:
    return publish_tiny_model(repo, make_tiny_model())


@pytest.fixture(scope="module")
def service(repo: Path, model: TinyModel) -> Iterator[Retrieval]:
    svc = Retrieval(repo)
    yield svc
    svc.close()


def test_target_user_gets_ann_candidates_by_inner_product(
    service: Retrieval, model: TinyModel
) -> None:
    reply = service.retrieve(user_id="u6", k=15)
    row = model.user_ids.index("u6")
    expected = np.argsort(-(model.item_emb @ model.user_emb[row]), kind="stable")[:15]
    assert [c.item_id for c in reply.candidates] == [model.item_ids[j] for j in expected]
    assert {c.source for c in reply.candidates} == {ANN}
    assert reply.candidates[0].title == model.titles[expected[0]]
    scores = [c.score for c in reply.candidates]
    assert scores == sorted(scores, reverse=True)
    assert reply.model.model_name == "books-retrieval"
    assert reply.model.model_version == str(model.version)


@pytest.mark.parametrize("user", ["u6", "c1", "nobody"])
def test_a_columnar_answer_holds_the_candidates_of_the_row_answer(
    service: Retrieval, user: str
) -> None:
    asked = {"user_id": user, "k": 40, "exclude_seen": True, "history_item_ids": ["i3", "i7"]}
    rows = service.retrieve(**asked)
    columnar = service.retrieve(**asked, columnar=True)
    assert rows.candidates and not rows.HasField("columns")
    assert not columnar.candidates and columnar.HasField("columns")
    assert (columnar.model, columnar.user) == (rows.model, rows.user)
    back = retrieval_from_reply(columnar).candidates.rows()
    assert back == retrieval_from_reply(rows).candidates.rows()
    assert [c.item_id for c in back] == [c.item_id for c in rows.candidates]
    packed = service.retrieve(**asked, columnar=True, packed=True)
    assert packed.columns.scores_f32 and not packed.columns.scores
    assert retrieval_from_reply(packed).candidates.rows() == back


@pytest.mark.parametrize("form", [{}, {"columnar": True, "packed": True}])
def test_the_popular_list_in_the_same_answer_is_the_popular_call_s(
    service: Retrieval, form: dict[str, bool]
) -> None:
    asked = {"user_id": "u6", "exclude_seen": True, "exclude_item_ids": ["i0"], **form}
    both = service.retrieve(**asked, k=30, popular_k=8)
    alone = service.retrieve(**asked, k=30)
    popular = service.retrieve(**asked, k=8, sources=[POPULAR])
    assert not alone.HasField("popular") and both.HasField("popular")
    back = retrieval_from_reply(both)
    assert back.candidates.rows() == retrieval_from_reply(alone).candidates.rows()
    assert back.popular is not None and len(back.popular) == 8
    assert back.popular.rows() == retrieval_from_reply(popular).candidates.rows()
    assert (both.popular.model, both.popular.user) == (popular.model, popular.user)


def test_cold_start_user_gets_transfer_candidates(service: Retrieval, model: TinyModel) -> None:
    reply = service.retrieve(user_id="c1", k=10, exclude_seen=True)
    assert {c.source for c in reply.candidates} == {TRANSFER}
    cluster = model.user_cluster[model.user_ids.index("c1")]
    assert all(
        model.item_cluster[model.item_ids.index(c.item_id)] == cluster for c in reply.candidates
    )


def test_seen_and_excluded_items_are_left_out(service: Retrieval, model: TinyModel) -> None:
    row = model.user_ids.index("u2")
    seen = {model.item_ids[j] for j in model.seen[row]}
    first = [c.item_id for c in service.retrieve(user_id="u2", k=30).candidates]
    assert seen & set(first)  # the planted seen items are among the user's best matches
    reply = service.retrieve(
        user_id="u2", k=30, exclude_seen=True, exclude_item_ids=[first[0]], history_item_ids=["i7"]
    )
    ids = [c.item_id for c in reply.candidates]
    assert len(ids) == 30 == len(set(ids))
    assert not set(ids) & (seen | {first[0], "i7"})


def test_unknown_and_anonymous_users_get_popular_items(
    service: Retrieval, model: TinyModel
) -> None:
    for user in ("nobody", ""):
        reply = service.retrieve(user_id=user, k=5)
        assert {c.source for c in reply.candidates} == {POPULAR}
        assert reply.candidates[0].score == float(model.popularity.max())
    only_popular = service.retrieve(user_id="u1", k=5, sources=[POPULAR])
    assert {c.source for c in only_popular.candidates} == {POPULAR}


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"domain": ""}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"k": 0}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"k": 201}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"popular_k": 201}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"exclude_item_ids": ["i1", ""]}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"history_item_ids": [""]}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"domain": "music"}, grpc.StatusCode.NOT_FOUND),
        ({"model_version": "99"}, grpc.StatusCode.NOT_FOUND),
    ],
)
def test_bad_requests_get_their_status_code(
    service: Retrieval, fields: dict[str, object], code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        service.retrieve(user_id="u1", **fields)
    assert info.value.code() == code
    assert info.value.details()


LONG = "\u00e9" + "x" * 20_000  # over the metadata limit if an error repeated it whole


@pytest.mark.parametrize(
    "fields",
    [
        {"user_id": LONG},
        {"domain": LONG},
        {"model_version": LONG},
        {"exclude_item_ids": ["i1", LONG]},
        {"history_item_ids": [LONG]},
        {"exclude_item_ids": ["i1"] * 10_001},
        {"history_item_ids": ["i1"] * 10_001},
    ],
)
def test_ids_and_repeated_fields_are_bounded(service: Retrieval, fields: dict[str, object]) -> None:
    fields.setdefault("user_id", "u1")
    with pytest.raises(grpc.RpcError) as info:
        service.retrieve(**fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert "above the limit" in details
    assert len(details) < 200 and "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" not in details


def test_follows_new_versions_and_keeps_serving_through_a_bad_one(
    service: Retrieval, repo: Path, model: TinyModel
) -> None:
    before = service.retrieve(user_id="u1").model.model_version
    bad = publish_corrupt_version(repo, "books-retrieval")
    assert not service.manager.refresh()
    assert service.retrieve(user_id="u1").model.model_version == before
    newer = publish_tiny_model(repo, make_tiny_model(seed=1))
    assert newer.version > bad
    assert service.manager.refresh()
    assert service.retrieve(user_id="u1").model.model_version == str(newer.version)
    with urllib.request.urlopen(
        f"http://127.0.0.1:{service.server.server.metrics_port}/metrics", timeout=5
    ) as reply:
        text = reply.read().decode()
    assert 'recsys_retrieval_model_load_failures_total{model="books-retrieval"} 1.0' in text
    assert (
        f'recsys_retrieval_model_loaded{{index="flat",model="books-retrieval",version="{newer.version}"}} 1.0'
        in text
    )
    assert 'recsys_retrieval_requests_total{domain="books",source="ann"}' in text
    assert 'recsys_retrieval_search_duration_seconds_count{domain="books"}' in text


def test_process_waits_for_a_model_then_serves(tmp_path: Path) -> None:
    """`python -m serving.retrieval` stays NOT_SERVING until a model appears, then polls it in."""
    proc = ServiceProcess(
        "serving.retrieval",
        [f"--model-repository={tmp_path}", "--poll-interval-s=0.2", "--grace-period-s=2"],
        log_path=tmp_path / "retrieval.log",
    )
    try:
        deadline = time.monotonic() + 30
        while health_status(proc.address) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health_status(proc.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        publish_tiny_model(tmp_path, make_tiny_model())
        proc.wait_serving(30)
        with grpc.insecure_channel(proc.address) as channel:
            reply = retrieval_pb2_grpc.RetrievalServiceStub(channel).Retrieve(
                retrieval_pb2.RetrieveRequest(user_id="u0", domain="books", k=3), timeout=10
            )
        assert len(reply.candidates) == 3
        assert proc.terminate() == 0
    finally:
        proc.kill()
