"""The int8 ranker of training/quantize.py: dense graphs become QLinear operators calibrated on
training pairs, the dot-product ranker gets int8 tables, the check compares rankings with fp32
and a graph that ranks unlike fp32 is not kept; Spearman's rho as its definition gives it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from bench.ranker import dlrm_ranker_graph
from devtools.tiny_models import make_tiny_model, ranker_graph
from recsys.repository import RANKER_SIGNATURE
from training import quantize
from training.quantize import (
    calibration_pairs,
    check_against_fp32,
    int8_graph,
    spearman,
    top_k_agreement,
)

INPUTS = RANKER_SIGNATURE.input_names


def _seen(n_users: int, n_items: int, per_user: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    indptr = np.arange(0, (n_users + 1) * per_user, per_user, dtype=np.int64)
    return indptr, rng.integers(0, n_items, n_users * per_user).astype(np.int64)


def test_spearman_matches_its_definition() -> None:
    a = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 3.0]])
    b = np.array([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    rho = spearman(a, b)
    assert rho[0] == pytest.approx(1.0) and rho[1] == pytest.approx(-1.0)
    # Ties take the average rank: ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4).
    ra, rb = np.array([1.5, 1.5, 3, 4]), np.array([1.0, 2, 3, 4])
    assert rho[2] == pytest.approx(np.corrcoef(ra, rb)[0, 1])


def test_top_k_agreement() -> None:
    ref = np.arange(20, dtype=float)[None, :]
    other = ref.copy()
    other[0, 19] = -1  # fp32's best item drops out of the other top 10
    assert top_k_agreement(ref, ref).tolist() == [1.0]
    assert top_k_agreement(ref, other).tolist() == [0.9]


def test_calibration_pairs_are_training_interactions() -> None:
    indptr, indices = np.array([0, 2, 2, 5]), np.array([7, 8, 1, 2, 3])
    batches = calibration_pairs((indptr, indices))
    pairs = {
        (int(u), int(i)) for users, items in batches for u, i in zip(users, items, strict=True)
    }
    assert pairs <= {(0, 7), (0, 8), (2, 1), (2, 2), (2, 3)}
    assert len(batches) == quantize.CALIBRATION_BATCHES


def test_a_dense_ranker_becomes_qlinear_operators_and_ranks_like_fp32(tmp_path: Path) -> None:
    n_users, n_items = 300, 2000
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(dlrm_ranker_graph(n_users, n_items), fp32)
    check = int8_graph(fp32, int8, INPUTS, _seen(n_users, n_items), n_users, n_items)
    assert check.method.startswith("static QOperator")
    assert check.users == 64 and check.candidates_per_user == 1000
    # A random MLP ranks noisily under int8; the check measures, the gate decides.
    assert 0.99 < check.spearman_mean <= 1.0 and check.spearman_min <= check.spearman_mean
    assert 0.0 < check.top10_agreement_mean <= 1.0
    assert int8.exists() == check.passed
    if check.passed:
        ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
        assert "QLinearMatMul" in ops or "QGemm" in ops


def test_the_dot_ranker_gets_8_bit_tables(tmp_path: Path) -> None:
    tiny = make_tiny_model("q", n_users=200, n_items=1500, dim=16)
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(ranker_graph(tiny.user_emb, tiny.item_emb), fp32)
    method = quantize.quantise(fp32, int8, INPUTS, calibration_pairs(_seen(200, 1500)))
    assert method.startswith("weight-only")
    tables = {i.name: i.data_type for i in onnx.load(str(int8)).graph.initializer}
    assert {tables["U_quantized"], tables["V_quantized"]} <= {
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
    }
    check = check_against_fp32(fp32, int8, INPUTS, 200, 1500, method=method)
    assert check.spearman_mean > 0.999


def test_a_graph_that_ranks_unlike_fp32_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quantize, "MIN_SPEARMAN", 1.5)  # no graph can pass
    tiny = make_tiny_model("q", n_users=50, n_items=300)
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(ranker_graph(tiny.user_emb, tiny.item_emb), fp32)
    check = int8_graph(fp32, int8, INPUTS, _seen(50, 300), 50, 300)
    assert not check.passed and not int8.exists()
    assert check.to_json()["passed"] is False
