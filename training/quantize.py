"""The int8 ranker: a quantised copy of the exported fp32 graph (ONNX Runtime quantisation,
calibrated on training pairs), kept only if it ranks like the fp32 graph.

* A graph with dense layers (MatMul/Gemm): static quantisation in QOperator form (QLinearMatMul
  and friends), int8 weights per output channel, uint8 activations with ranges from the
  99.999th percentile of the activations on training (user, item) pairs.
* A graph without any (the dot-product ranker): its embedding tables become 8-bit (weight-only
  quantisation of the Gathers, dequantised after the lookup): a quarter of the memory.

The check scores candidate lists with both graphs, per user: Spearman's rank correlation of the
scores and the share of fp32's top 10 that the int8 graph also ranks in its top 10, both as
mean and minimum over users. The int8 graph is published only if the means reach MIN_SPEARMAN
and MIN_TOP10."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

logger = logging.getLogger(__name__)

MIN_SPEARMAN = 0.999
MIN_TOP10 = 0.99
CALIBRATION_BATCHES = 16
CALIBRATION_BATCH = 1000
DENSE_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class QuantisationCheck:
    """int8 against fp32 on the same candidate lists."""

    method: str
    users: int
    candidates_per_user: int
    spearman_mean: float
    spearman_min: float
    top10_agreement_mean: float
    top10_agreement_min: float
    max_abs_error: float

    @property
    def passed(self) -> bool:
        return self.spearman_mean >= MIN_SPEARMAN and self.top10_agreement_mean >= MIN_TOP10

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "passed": self.passed,
            "thresholds": {"spearman_mean": MIN_SPEARMAN, "top10_agreement_mean": MIN_TOP10},
        }


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties averaged (Spearman's definition)."""
    order = np.argsort(x, axis=-1, kind="stable")
    ranks = np.empty_like(order, dtype=np.float64)
    np.put_along_axis(ranks, order, np.arange(x.shape[-1], dtype=np.float64)[None, :], axis=-1)
    # Average the ranks of equal scores (rare with float scores, but exact when they occur).
    for row in range(x.shape[0]):
        values, inverse, counts = np.unique(x[row], return_inverse=True, return_counts=True)
        if len(values) != x.shape[1]:
            sums = np.bincount(inverse, weights=ranks[row])
            ranks[row] = (sums / counts)[inverse]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each row of `a` with the same row of `b`."""
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denominator = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    out: np.ndarray = np.where(denominator > 0, (ra * rb).sum(axis=1) / denominator, 1.0)
    return out


def top_k_agreement(reference: np.ndarray, other: np.ndarray, k: int = 10) -> np.ndarray:
    """Per row: the share of the reference's top k that `other` also ranks in its top k."""
    k = min(k, reference.shape[1])
    top_ref = np.argpartition(-reference, k - 1, axis=1)[:, :k]
    top_other = np.argpartition(-other, k - 1, axis=1)[:, :k]
    return np.array([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_other, strict=True)])


def calibration_pairs(
    seen: tuple[np.ndarray, np.ndarray], seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches of training (user, item) pairs from the interaction matrix (CSR indptr, indices)."""
    indptr, indices = (np.asarray(a) for a in seen)
    users = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    if not len(users):
        raise ValueError("no training interactions to calibrate on")
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(CALIBRATION_BATCHES):
        rows = rng.integers(0, len(users), CALIBRATION_BATCH)
        batches.append((users[rows], np.asarray(indices, np.int64)[rows]))
    return batches


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over prepared feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantise(
    fp32: Path, out: Path, input_names: list[str], calibration: Sequence[tuple[np.ndarray, ...]]
) -> str:
    """Write the int8 graph of `fp32` to `out`; returns the method used."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    ops = {node.op_type for node in onnx.load(str(fp32)).graph.node}
    if ops & set(DENSE_OPS):
        feeds = [dict(zip(input_names, batch, strict=True)) for batch in calibration]
        quantize_static(
            str(fp32),
            str(out),
            _Reader(feeds),
            quant_format=QuantFormat.QOperator,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=[*DENSE_OPS, "Relu"],
            per_channel=True,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": 99.999},
        )
        return "static QOperator (int8 weights per channel, uint8 activations, percentile)"
    quantize_dynamic(
        str(fp32), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"]
    )
    return "weight-only 8-bit embedding tables (Gather)"


def check_against_fp32(
    fp32: Path,
    int8: Path,
    input_names: list[str],
    n_users: int,
    n_items: int,
    *,
    method: str,
    users: int = 64,
    candidates: int = 1000,
    seed: int = 0,
) -> QuantisationCheck:
    """Score the same candidate lists (distinct random items per sampled user) with both graphs."""
    rng = np.random.default_rng(seed)
    per_user = min(candidates, n_items)
    picked = rng.choice(n_users, size=min(users, n_users), replace=False).astype(np.int64)
    item_rows = np.stack([rng.choice(n_items, per_user, replace=False) for _ in picked])
    sessions = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8)
    ]
    scores = []
    for session in sessions:
        feeds = dict(
            zip(
                input_names,
                (np.repeat(picked, per_user), item_rows.reshape(-1).astype(np.int64)),
                strict=True,
            )
        )
        scores.append(np.asarray(session.run(None, feeds)[0], np.float64).reshape(len(picked), -1))
    reference, quantised = scores
    rho = spearman(reference, quantised)
    agreement = top_k_agreement(reference, quantised)
    return QuantisationCheck(
        method=method,
        users=len(picked),
        candidates_per_user=per_user,
        spearman_mean=float(rho.mean()),
        spearman_min=float(rho.min()),
        top10_agreement_mean=float(agreement.mean()),
        top10_agreement_min=float(agreement.min()),
        max_abs_error=float(np.abs(reference - quantised).max()),
    )


def int8_graph(
    fp32: Path,
    out: Path,
    input_names: list[str],
    seen: tuple[np.ndarray, np.ndarray],
    n_users: int,
    n_items: int,
) -> QuantisationCheck:
    """Quantise, then check: `out` exists afterwards only if the check passed."""
    method = quantise(fp32, out, input_names, list(calibration_pairs(seen)))
    check = check_against_fp32(fp32, out, input_names, n_users, n_items, method=method)
    if check.passed:
        logger.info("int8 ranker: %s", check.to_json())
    else:
        logger.warning("int8 ranker not published, it ranks unlike fp32: %s", check.to_json())
        out.unlink()
    return check
