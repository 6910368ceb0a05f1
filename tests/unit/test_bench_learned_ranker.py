"""The benchmarks' options for the learned ranker: bench-ranker's graph of the learned ranker's
architecture (published, loadable, features [N, 13] -> score [N]) and its request payloads,
bench-gateway's --repository, bench-system's comparison with the quality benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench import gateway, ranker, ranker_int8, system
from recsys.features import FEATURE_NAMES
from recsys.inference import grpc_service_pb2 as pb
from recsys.repository import read_metadata
from recsys.v1 import ranking_pb2


def test_bench_ranker_options_parse() -> None:
    args = ranker.build_parser().parse_args(
        ["--feature-repository=/r", "--feature-model=books-ranker", "--feature-concurrency=1,4"]
    )
    assert args.feature_ranker is True
    assert args.feature_repository == Path("/r") and args.feature_model == "books-ranker"
    assert args.feature_concurrency == "1,4"
    assert ranker.build_parser().parse_args(["--no-feature-ranker"]).feature_ranker is False


def test_bench_gateway_repository_option_parses() -> None:
    args = gateway.build_parser().parse_args(["--repository=/runs/repo", "--rates=50"])
    assert args.repository == Path("/runs/repo") and args.rates == "50"
    assert gateway.build_parser().parse_args([]).repository is None


def test_published_feature_graph_scores_feature_rows(tmp_path: Path) -> None:
    path = ranker.publish_feature_model(tmp_path, n_items=50)
    meta = read_metadata(path.parent)
    assert meta["features"]["names"] == list(FEATURE_NAMES)
    assert meta["features"]["retrieval_version"] == ranker.FEATURE_RETRIEVAL[1]
    assert (path.parent / "READY").is_file() and path.parent.name == "1"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = ranker.feature_rows(1000)
    (scores,) = session.run(None, {"features": rows})
    assert scores.shape == (1000,) and np.isfinite(scores).all()
    timing = ranker.graph_run_ms(path, {"features": rows}, seconds=0.05)
    assert timing["runs"] >= 100 and 0 < timing["p50_ms"] <= timing["p99_ms"]


@pytest.mark.parametrize("api", ["rank", "oip"])
def test_feature_payloads_carry_rows_and_the_features_version(api: str) -> None:
    (payload,) = ranker.feature_payloads("m", 7, api, pool=1)
    width = len(FEATURE_NAMES)
    if api == "rank":
        request = ranking_pb2.RankRequest.FromString(payload)
        assert len(request.item_ids) == 7 and len(request.features_f32) == 7 * width * 4
        assert not request.features  # the packed form only, as the gateway sends
        assert request.features_version == ranker.FEATURE_RETRIEVAL[1]
    else:
        infer = pb.ModelInferRequest.FromString(payload)
        assert list(infer.inputs[0].shape) == [7, width] and infer.inputs[0].datatype == "FP32"
        assert len(infer.raw_input_contents[0]) == 7 * width * 4
        assert infer.parameters["features_version"].string_param == ranker.FEATURE_RETRIEVAL[1]
    changed = ranker._with_version(payload, api, "9")
    if api == "rank":
        assert ranking_pb2.RankRequest.FromString(changed).features_version == "9"
    else:
        infer = pb.ModelInferRequest.FromString(changed)
        assert infer.parameters["features_version"].string_param == "9"


def test_quality_best_reads_the_chosen_row_on_the_matching_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def row(full: bool) -> dict[str, list[float]]:
        out = {}
        for seg, value in (("warm", 0.25), ("cold", 0.15)):
            out[f"{seg} ndcg@10"] = [value, 0.01, 3]
            out[f"full {seg} ndcg@10"] = [value / 2, 0.01, 3] if full else [float("nan"), 0, 0]
        return out

    jobs = {
        "ratio_pair": {"protocol": "ratio", "summary": {"0.2": {"roles": {"chosen": row(False)}}}},
        "loo_pair": {"protocol": "loo", "summary": {"0.2": {"roles": {"chosen": row(True)}}}},
    }
    (tmp_path / "quality.json").write_text(json.dumps({"jobs": jobs}))
    monkeypatch.setattr(system, "RESULTS", tmp_path)
    ratio = system.quality_best("ratio_pair")
    assert ratio is not None and ratio["warm"]["mean"] == 0.25 and ratio["cold"]["mean"] == 0.15
    loo = system.quality_best("loo_pair")  # sampled-negative figures are not comparable: full
    assert loo is not None and loo["warm"]["mean"] == 0.125 and loo["protocol"] == "loo"
    assert system.quality_best("missing") is None
    assert system.quality_best("ratio_pair", share="0.5") is None


def test_bench_ranker_int8_options_parse_and_an_empty_folder_exits_2(tmp_path: Path) -> None:
    args = ranker_int8.build_parser().parse_args([f"--work={tmp_path}", "--runs=a-s0,b-s1"])
    assert args.work == tmp_path and args.runs == "a-s0,b-s1"
    assert ranker_int8.main([f"--work={tmp_path}", f"--out={tmp_path / 'x'}"]) == 2
