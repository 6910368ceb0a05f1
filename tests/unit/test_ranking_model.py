"""RankerModel without gRPC: loading checks (hashes, signature, vocabularies), lookups, scores,
and the choice of execution provider."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from devtools.tiny_models import (
    RANKER_INPUTS,
    RANKER_OUTPUTS,
    TinyModel,
    make_tiny_model,
    publish_tiny_model,
    ranker_graph,
)
from recsys.repository import VersionPublisher, version_dir
from serving.ranking.model import (
    CPU,
    CUDA,
    ModelLoadError,
    ProviderUnavailable,
    RankerModel,
    SessionOptions,
    UnknownIds,
    resolve_providers,
)

OPTIONS = SessionOptions(providers=(CPU,), intra_op_threads=1, warmup_candidates=64)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyModel]:
    repo = tmp_path_factory.mktemp("repo")
    return repo, publish_tiny_model(repo, make_tiny_model("unit"))


def _load(repo: Path, version: int, name: str = "unit-ranker") -> RankerModel:
    return RankerModel.load(name, version, version_dir(repo, name, version), OPTIONS)


def test_load_lookup_and_score(published: tuple[Path, TinyModel]) -> None:
    repo, tiny = published
    model = _load(repo, tiny.version)
    assert (model.n_users, model.n_items, model.provider) == (46, 120, CPU)
    users, items = model.lookup("u3", ["i5", "i0", "i5"])
    assert users.tolist() == [3, 3, 3] and items.tolist() == [5, 0, 5]
    direct = ort.InferenceSession(
        str(version_dir(repo, "unit-ranker", tiny.version) / "model.onnx")
    )
    expected = direct.run(["score"], {"user_index": users, "item_index": items})[0]
    np.testing.assert_allclose(model.score(users, items), expected, rtol=1e-6)


def test_unknown_ids_are_named(published: tuple[Path, TinyModel]) -> None:
    repo, tiny = published
    model = _load(repo, tiny.version)
    with pytest.raises(UnknownIds, match="unknown user id: 'nobody'"):
        model.lookup("nobody", ["i1"])
    ids = ["i1"] + [f"x{k}" for k in range(7)]
    with pytest.raises(UnknownIds) as info:
        model.lookup("u1", ids)
    assert str(info.value) == "unknown item ids: 'x0', 'x1', 'x2', 'x3', 'x4' and 2 more"


def test_io_binding_gives_the_same_scores(published: tuple[Path, TinyModel]) -> None:
    repo, tiny = published
    plain = _load(repo, tiny.version)
    bound = RankerModel.load(
        "unit-ranker",
        tiny.version,
        version_dir(repo, "unit-ranker", tiny.version),
        SessionOptions(providers=(CPU,), io_binding=True, warmup_candidates=16),
    )
    users, items = plain.lookup("u7", [f"i{j}" for j in range(50)])
    np.testing.assert_array_equal(bound.score(users, items), plain.score(users, items))


def test_the_solo_session_scores_as_the_main_one(published: tuple[Path, TinyModel]) -> None:
    repo, tiny = published
    assert _load(repo, tiny.version).solo_session is None  # off unless set
    wide = RankerModel.load(
        "unit-ranker",
        tiny.version,
        version_dir(repo, "unit-ranker", tiny.version),
        SessionOptions(providers=(CPU,), intra_op_threads=1, solo_intra_op_threads=2),
    )
    assert wide.solo_session is not None and wide.solo_session is not wide.session
    assert wide.solo_threads == 2 and wide.describe()["solo_intra_op_threads"] == 2
    users, items = wide.lookup("u9", [f"i{j}" for j in range(120)])
    np.testing.assert_allclose(
        wide.score(users, items, solo=True), wide.score(users, items), rtol=1e-6
    )


def _publish(repo: Path, graph: onnx.ModelProto, tiny: TinyModel, **overrides: object) -> int:
    metadata = {"kind": "ranker", "inputs": RANKER_INPUTS, "outputs": RANKER_OUTPUTS}
    metadata.update(overrides)
    with VersionPublisher(repo, ["unit-ranker"]) as pub:
        d = pub.stage("unit-ranker")
        onnx.save(graph, d / "model.onnx")
        (d / "users.json").write_text(json.dumps({"ids": tiny.user_ids}))
        (d / "items.json").write_text(json.dumps({"ids": tiny.item_ids}))
        (d / "metadata.json").write_text(json.dumps(metadata))
    assert pub.version is not None
    return pub.version


def _int32_graph(tiny: TinyModel) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Cast", ["user_index"], ["u64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["U", "u64"], ["u"], axis=0),
        helper.make_node("Gather", ["V", "item_index"], ["v"], axis=0),
        helper.make_node("Mul", ["u", "v"], ["uv"]),
        helper.make_node("ReduceSum", ["uv", "axes"], ["score"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "int32",
        [
            helper.make_tensor_value_info("user_index", TensorProto.INT32, ["N"]),
            helper.make_tensor_value_info("item_index", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        initializer=[
            numpy_helper.from_array(tiny.user_emb, "U"),
            numpy_helper.from_array(tiny.item_emb, "V"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_versions_that_break_the_contract_are_refused(tmp_path: Path) -> None:
    tiny = make_tiny_model("unit")
    good = ranker_graph(tiny.user_emb, tiny.item_emb)
    cases = {
        _publish(tmp_path, _int32_graph(tiny), tiny): "'user_index' is tensor(int32)",
        _publish(tmp_path, good, tiny, kind="retrieval"): "not 'ranker'",
        _publish(
            tmp_path, good, tiny, outputs=[{"name": "logit", "datatype": "FP32", "shape": [-1]}]
        ): "declares outputs ['logit FP32 [-1]']",
    }
    for version, needle in cases.items():
        with pytest.raises(ModelLoadError, match=re.escape(needle)):
            _load(tmp_path, version)


def test_corrupt_and_incomplete_versions_are_refused(tmp_path: Path) -> None:
    first = publish_tiny_model(tmp_path, make_tiny_model("unit")).version
    second = publish_tiny_model(tmp_path, make_tiny_model("unit")).version
    (version_dir(tmp_path, "unit-ranker", first) / "items.json").write_text('{"ids": []}')
    with pytest.raises(ModelLoadError, match="items.json is corrupt"):
        _load(tmp_path, first)
    (version_dir(tmp_path, "unit-ranker", second) / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match="model.onnx is listed in metadata.json but missing"):
        _load(tmp_path, second)


def test_provider_choice(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_providers("cpu") == [CPU]
    if CUDA in ort.get_available_providers():
        assert resolve_providers("auto") == [CUDA, CPU]
        assert resolve_providers("cuda") == [CUDA, CPU]
        return
    with caplog.at_level(logging.WARNING):
        assert resolve_providers("auto") == [CPU]
    assert "CUDAExecutionProvider is not available" in caplog.text
    with pytest.raises(ProviderUnavailable, match="onnxruntime-gpu"):
        resolve_providers("cuda")


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="CUDA is present here")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_a_session_without_the_required_provider(
    published: tuple[Path, TinyModel], caplog: pytest.LogCaptureFixture
) -> None:
    """ONNX Runtime quietly falls back to CPU when CUDA cannot be used: 'cuda' refuses that,
    'auto' accepts it with a warning."""
    repo, tiny = published
    directory = version_dir(repo, "unit-ranker", tiny.version)
    required = SessionOptions(providers=(CUDA, CPU), require_provider=True, warmup_candidates=8)
    with pytest.raises(ProviderUnavailable, match="CUDAExecutionProvider is required"):
        RankerModel.load("unit-ranker", tiny.version, directory, required)
    preferred = SessionOptions(providers=(CUDA, CPU), warmup_candidates=8)
    with caplog.at_level(logging.WARNING):
        model = RankerModel.load("unit-ranker", tiny.version, directory, preferred)
    assert model.provider == CPU and "no CUDAExecutionProvider session" in caplog.text
