"""The second stage end to end on the synthetic generator: neighbour lists published with
retrieval, the learned ranker's ONNX parity and feature contract, the ranking service serving it
(Rank and the Open Inference Protocol), and a recommendation whose order comes from it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch

from gateway.clients import GrpcRankers
from gateway.pipeline import (
    Pipeline,
    PipelineConfig,
    Ranked,
    RankQuery,
    RecommendQuery,
    RetrieveQuery,
)
from offline.local import LocalRanker, LocalRetriever
from recsys.candidates import PERSONAL_SOURCES, Source, merge_candidates
from recsys.features import FEATURE_NAMES, candidate_features
from recsys.inference import grpc_service_pb2 as pb
from recsys.repository import read_metadata, read_users, verify_version
from recsys.sources import NEIGHBOURS_FILE, Neighbours
from recsys.v1 import ranking_pb2
from tests.integration.test_ranking_server import Ranker
from training.config import load_config
from training.run import run

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = REPO_ROOT / "training" / "configs" / "synthetic.toml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("second-stage")
    cfg = load_config(
        SYNTHETIC, ["--threads=1", "--strategies=finetune", "--epochs=15", "--source_epochs=15"]
    )
    results = run(cfg, None, base / "run", base / "repo")
    return {"results": results, "repo": base / "repo", "run_dir": base / "run"}


@pytest.fixture(scope="module")
def ranker_server(trained: dict[str, Any]) -> Iterator[Ranker]:
    server = Ranker(trained["repo"], "target-ranker,target-dot-ranker")
    yield server
    server.close()


def _warm_user(repo: Path) -> str:
    users = read_users(repo / "target-retrieval" / "1" / "users.json")
    return next(u for u, k in zip(users.ids, users.kinds, strict=True) if k == "target")


async def _served_candidates(repo: Path, user: str) -> tuple[list[Any], np.ndarray, str]:
    """The merged candidates and features the pipeline builds for `user` (default config)."""
    retriever = LocalRetriever(repo)
    cfg = PipelineConfig()

    def ask(k: int, sources: tuple[Source, ...]) -> RetrieveQuery:
        return RetrieveQuery(user, "target", k, exclude_seen=True, sources=sources)

    personal = await retriever.retrieve(ask(cfg.retrieval_candidates, PERSONAL_SOURCES), timeout=9)
    popular = await retriever.retrieve(ask(cfg.popular_candidates, (Source.POPULAR,)), timeout=9)
    merged = merge_candidates([personal.candidates, popular.candidates])
    return merged.rows(), candidate_features(merged, personal.user), personal.model_version


@dataclass(frozen=True)
class Served:
    """A warm user's merged candidates as the pipeline serves them."""

    user: str
    ids: list[str]
    features: np.ndarray
    version: str  # the retrieval version that computed the features


@pytest.fixture(scope="module")
def served(trained: dict[str, Any]) -> Served:
    user = _warm_user(trained["repo"])
    merged, features, version = asyncio.run(_served_candidates(trained["repo"], user))
    return Served(user, [c.item_id for c in merged], features, version)


def test_publish_holds_neighbours_and_a_feature_ranker(trained: dict[str, Any]) -> None:
    repo = trained["repo"]
    assert set(trained["results"]["published"]["models"]) == {
        "target-ranker",
        "target-dot-ranker",
        "target-retrieval",
    }
    retrieval = repo / "target-retrieval" / "1"
    meta = verify_version(retrieval)
    assert NEIGHBOURS_FILE in meta["files"]
    users = read_users(retrieval / "users.json")
    n_items = len(read_metadata(retrieval) and np.load(retrieval / "item_embeddings.npy"))
    neighbours = Neighbours.load(retrieval / NEIGHBOURS_FILE, n_items, len(users.ids))
    assert (neighbours.target[:, 0] >= 0).mean() > 0.9  # almost every item has a neighbour
    ranker = read_metadata(repo / "target-ranker" / "1")
    assert ranker["inputs"] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, len(FEATURE_NAMES)]}
    ]
    assert ranker["features"] == {
        "names": list(FEATURE_NAMES),
        "retrieval_model": "target-retrieval",
        "retrieval_version": "1",
    }
    validation = ranker["training"]["validation"]
    assert {"retrieval", "dot", "learned", "candidate_recall"} <= set(validation)


def test_learned_ranker_onnx_matches_torch(trained: dict[str, Any]) -> None:
    ckpt = torch.load(trained["run_dir"] / "checkpoint.pt", weights_only=False)
    module = ckpt["learned_ranker"]["module"].eval()
    rng = np.random.default_rng(5)
    features = rng.standard_normal((1000, len(FEATURE_NAMES))).astype(np.float32) * 3
    session = ort.InferenceSession(str(trained["repo"] / "target-ranker" / "1" / "model.onnx"))
    got = session.run(None, {"features": features})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_recommend_order_comes_from_the_learned_ranker(trained: dict[str, Any]) -> None:
    repo = trained["repo"]
    user = _warm_user(repo)
    pipeline = Pipeline(LocalRetriever(repo), LocalRanker(repo))
    result = asyncio.run(
        pipeline.recommend(RecommendQuery(user, "target", 10, exclude_seen=True), timeout=60)
    )
    assert not result.degraded and result.ranked
    assert ("target-ranker", "1") in result.model_versions
    merged, features, _ = asyncio.run(_served_candidates(repo, user))
    session = ort.InferenceSession(str(repo / "target-ranker" / "1" / "model.onnx"))
    scores = session.run(None, {"features": features})[0]
    order = np.argsort(-scores, kind="stable")[:10]
    assert [c.item_id for c in result.items] == [merged[i].item_id for i in order]
    np.testing.assert_allclose([c.score for c in result.items], scores[order], rtol=1e-5)
    # positions in retrieval order before ranking, for the demo
    assert result.retrieval_positions == [int(i) + 1 for i in order]
    # the dot-product ranker of the same publish orders the same candidates differently
    dot = Pipeline(LocalRetriever(repo), LocalRanker(repo, suffix="dot-ranker"))
    by_dot = asyncio.run(
        dot.recommend(RecommendQuery(user, "target", 10, exclude_seen=True), timeout=60)
    )
    personal = {c.item_id: features[i, 0] for i, c in enumerate(merged)}
    np.testing.assert_allclose(
        [c.score for c in by_dot.items], [personal[c.item_id] for c in by_dot.items], rtol=1e-5
    )
    assert [c.item_id for c in by_dot.items] != [c.item_id for c in result.items]


def _rank(
    user: str,
    ids: list[str],
    features: np.ndarray,
    version: str,
    model: str = "target-ranker",
    packed: bool = False,
) -> ranking_pb2.RankRequest:
    """A Rank request with the features as repeated floats (older gateways) or, `packed`, as
    little-endian float32 bytes in features_f32."""
    request = ranking_pb2.RankRequest(
        model_name=model, user_id=user, item_ids=ids, features_version=version
    )
    if packed:
        request.features_f32 = features.astype("<f4").tobytes()
    else:
        request.features.extend(features.ravel().tolist())
    return request


def test_rank_scores_features_and_refuses_another_retrieval_version(
    trained: dict[str, Any], served: Served, ranker_server: Ranker
) -> None:
    repo = trained["repo"]
    user, ids, features, version = served.user, served.ids, served.features, served.version
    reply = ranker_server.rank.Rank(_rank(user, ids, features, version), timeout=10)
    session = ort.InferenceSession(str(repo / "target-ranker" / "1" / "model.onnx"))
    want = session.run(None, {"features": features})[0]
    np.testing.assert_allclose(reply.scores, want, rtol=1e-5)
    assert reply.model_version == "1"

    for bad_version in ("2", ""):
        with pytest.raises(grpc.RpcError) as err:
            ranker_server.rank.Rank(_rank(user, ids, features, bad_version), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "target-retrieval version 1" in err.value.details()
    bad = features.copy()
    bad[3, 2] = np.nan
    for rows, text in ((features[:-1], "values"), (bad, "NaN"), (features * 1e7, "1e+06")):
        with pytest.raises(grpc.RpcError) as err:
            ranker_server.rank.Rank(_rank(user, ids, rows, version), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, text
        assert text in err.value.details()
    # The dot-product ranker of the same publish ignores the features and still serves.
    dot = ranker_server.rank.Rank(
        _rank(user, ids[:5], features[:5], "", model="target-dot-ranker"), timeout=10
    )
    assert len(dot.scores) == 5


def test_packed_features_score_exactly_like_repeated_floats(
    served: Served, ranker_server: Ranker
) -> None:
    user, ids, features, version = served.user, served.ids, served.features, served.version
    floats = ranker_server.rank.Rank(_rank(user, ids, features, version), timeout=10)
    packed = ranker_server.rank.Rank(_rank(user, ids, features, version, packed=True), timeout=10)
    assert len(packed.scores) == len(ids)
    np.testing.assert_array_equal(np.array(packed.scores), np.array(floats.scores))
    assert packed.model_version == floats.model_version == "1"

    both = _rank(user, ids, features, version, packed=True)
    both.features.extend(features.ravel().tolist())
    width = len(FEATURE_NAMES)
    need = len(ids) * width * 4
    refused = {
        "both": (both, "set features or features_f32, not both"),
        "short": (_rank(user, ids, features[:-1], version, packed=True), f"= {need} bytes"),
        "ragged": (
            ranking_pb2.RankRequest(
                model_name="target-ranker",
                user_id=user,
                item_ids=ids,
                features_version=version,
                features_f32=features.astype("<f4").tobytes()[:-1],
            ),
            f"got {need - 1} bytes, not a whole number of float32",
        ),
    }
    bad = features.copy()
    bad[3, 2] = np.inf
    refused["inf"] = (_rank(user, ids, bad, version, packed=True), "NaN, infinite")
    for name, (request, text) in refused.items():
        with pytest.raises(grpc.RpcError) as err:
            ranker_server.rank.Rank(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert text in err.value.details(), name
    # The retrieval version is checked first, whichever form carries the features.
    with pytest.raises(grpc.RpcError) as err:
        ranker_server.rank.Rank(_rank(user, ids, features, "2", packed=True), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_the_gateway_client_sends_packed_features(served: Served, ranker_server: Ranker) -> None:
    user, ids, features, version = served.user, tuple(served.ids), served.features, served.version
    lo, hi = 3, len(ids) - 2  # a shard's rows, as the pipeline slices them

    async def rank() -> Ranked:
        async with grpc.aio.insecure_channel(ranker_server.bg.address) as channel:
            rankers = GrpcRankers([("ranker", channel)])
            query = RankQuery("target-ranker", "", user, ids[lo:hi], features[lo:hi], version)
            return await rankers.rank(query, replica=0, timeout=10)

    ranked = asyncio.run(rank())
    floats = ranker_server.rank.Rank(
        _rank(user, list(ids[lo:hi]), features[lo:hi], version), timeout=10
    )
    np.testing.assert_array_equal(np.array(ranked.scores, np.float32), np.array(floats.scores))
    assert ranked.model_version == "1"


def test_open_inference_protocol_takes_feature_rows(
    trained: dict[str, Any], ranker_server: Ranker
) -> None:
    features = np.random.default_rng(0).standard_normal((7, len(FEATURE_NAMES)), np.float32)

    def infer(rows: np.ndarray, version: str | None) -> pb.ModelInferResponse:
        request = pb.ModelInferRequest(model_name="target-ranker")
        request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
        request.raw_input_contents.append(rows.astype("<f4").tobytes())
        if version is not None:
            request.parameters["features_version"].string_param = version
        return ranker_server.oip.ModelInfer(request, timeout=10)

    reply = infer(features, "1")
    got = np.frombuffer(reply.raw_output_contents[0], "<f4")
    session = ort.InferenceSession(str(trained["repo"] / "target-ranker" / "1" / "model.onnx"))
    np.testing.assert_allclose(got, session.run(None, {"features": features})[0], rtol=1e-5)
    assert list(reply.outputs[0].shape) == [7]
    with pytest.raises(grpc.RpcError) as err:
        infer(features, None)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        infer(features[:, :5], "1")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "[N, 13]" in err.value.details()
