"""A version's graphs: RANKING_PRECISION picks the int8 graph where the version lists one (else
fp32, logged), the repository's `graphs` and tensor-name maps are checked, and a graph whose
tensors are named like another server's (INPUT__0, ...) serves through the declared mapping."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from devtools.tiny_models import make_tiny_model, ranker_graph, write_vocabularies
from recsys.repository import MODEL_FILE, RANKER_SIGNATURE, RepositoryError, VersionPublisher
from recsys.repository.graphs import (
    INT8_MODEL_FILE,
    GraphNames,
    choose_graph,
    graph_files,
)
from serving.ranking.model import CPU, ModelLoadError, RankerModel, SessionOptions
from training.quantize import calibration_pairs, quantise

TINY = make_tiny_model("g", n_users=60, n_items=400, dim=16)


def _publish(repo: Path, metadata: dict[str, Any], graph: onnx.ModelProto, int8: bool) -> Path:
    with VersionPublisher(repo, ["g-ranker"]) as pub:
        d = pub.describe("g-ranker", kind="ranker", signature=RANKER_SIGNATURE, metadata=metadata)
        onnx.save(graph, d / MODEL_FILE)
        if int8:
            seen = (np.arange(61, dtype=np.int64) * 3, np.arange(180, dtype=np.int64) % 400)
            quantise(
                d / MODEL_FILE,
                d / INT8_MODEL_FILE,
                RANKER_SIGNATURE.input_names,
                calibration_pairs(seen),
            )
        write_vocabularies(d, TINY)
    assert pub.version is not None
    return repo / "g-ranker" / str(pub.version)


def _load(directory: Path, precision: str) -> RankerModel:
    options = SessionOptions(
        providers=(CPU,), intra_op_threads=1, warmup_candidates=64, precision=precision
    )
    return RankerModel.load("g-ranker", int(directory.name), directory, options)


def _pairs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.integers(0, 60, 300).astype(np.int64), rng.integers(0, 400, 300).astype(np.int64)


def test_int8_is_served_where_the_version_lists_it(tmp_path: Path) -> None:
    graphs = {"fp32": MODEL_FILE, "int8": INT8_MODEL_FILE}
    d = _publish(tmp_path, {"graphs": graphs}, ranker_graph(TINY.user_emb, TINY.item_emb), True)
    fp32, int8 = _load(d, "fp32"), _load(d, "int8")
    assert fp32.graph.precision == "fp32" and fp32.graph.path.name == MODEL_FILE
    assert int8.graph.precision == "int8" and int8.graph.path.name == INT8_MODEL_FILE
    assert int8.describe()["precision"] == "int8"
    users, items = _pairs()
    a, b = fp32.score(users, items), int8.score(users, items)
    assert not np.array_equal(a, b)  # a different graph...
    assert np.corrcoef(a, b)[0, 1] > 0.999  # ...that scores alike


def test_a_version_without_int8_serves_fp32_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = _publish(tmp_path, {}, ranker_graph(TINY.user_emb, TINY.item_emb), False)
    with caplog.at_level(logging.WARNING):
        model = _load(d, "int8")
    assert model.graph.precision == "fp32"
    assert "has no int8 graph" in caplog.text


def test_a_peer_graph_with_other_tensor_names_serves_through_the_mapping(tmp_path: Path) -> None:
    graph = ranker_graph(TINY.user_emb, TINY.item_emb)
    renames = {"user_index": "INPUT__0", "item_index": "INPUT__1", "score": "OUTPUT__0"}
    for node in graph.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in [*graph.graph.input, *graph.graph.output]:
        value.name = renames[value.name]
    metadata = {
        "graph_inputs": {"user_index": "INPUT__0", "item_index": "INPUT__1"},
        "graph_outputs": {"score": "OUTPUT__0"},
    }
    d = _publish(tmp_path, metadata, graph, False)
    model = _load(d, "fp32")
    users, items = _pairs()
    expected = (TINY.user_emb[users] * TINY.item_emb[items]).sum(axis=1)
    np.testing.assert_allclose(model.score(users, items), expected, rtol=1e-5, atol=1e-5)
    # Without the mapping the same graph is refused, naming the graph's inputs.
    d = _publish(tmp_path, {}, graph, False)
    with pytest.raises(ModelLoadError, match="INPUT__0"):
        _load(d, "fp32")


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"graphs": {"fp16": "model.onnx"}}, "'graphs' must map precisions"),
        ({"graphs": {"fp32": "../other/model.onnx"}}, "must be a file of the version"),
        ({"graphs": []}, "'graphs' must map precisions"),
        ({"graph_inputs": {"user_index": 3}}, "'graph_inputs' must map"),
        ({"graph_outputs": ["score"]}, "'graph_outputs' must map"),
        ({"graph_inputs": {"user_index": "x", "item_index": "x"}}, "names a tensor twice"),
    ],
)
def test_malformed_graph_metadata_is_refused(
    tmp_path: Path, metadata: dict[str, Any], message: str
) -> None:
    with pytest.raises(RepositoryError, match=message):
        graph_files(metadata, Path("v1"))
        GraphNames.from_metadata(metadata, Path("v1"))
    with pytest.raises(ModelLoadError, match=message):
        _load(
            _publish(tmp_path, metadata, ranker_graph(TINY.user_emb, TINY.item_emb), False), "fp32"
        )


def test_versions_before_graphs_hold_one_fp32_graph() -> None:
    assert graph_files({}, Path("v1")) == {"fp32": MODEL_FILE}
    assert choose_graph({}, Path("v1"), "int8") == ("fp32", MODEL_FILE)
    only_int8 = {"graphs": {"int8": INT8_MODEL_FILE}}
    assert choose_graph(only_int8, Path("v1"), "fp32") == ("int8", INT8_MODEL_FILE)
