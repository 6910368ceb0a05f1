"""ONNX export of a trained run and publication into the model repository.

Graphs (opset 17, dynamic batch dimension):

* ``<domain>-ranker/model.onnx``: ``user_index`` INT64 [-1], ``item_index`` INT64 [-1] ->
  ``score`` FP32 [-1], row i scores user_index[i] with item_index[i] (dot product of the towers);
  beside it ``model.int8.onnx``, its quantised copy (training/quantize.py), where that ranks
  like fp32; metadata.json's ``graphs`` lists the graphs and ``int8_check`` the comparison.
* ``<domain>-retrieval/model.onnx``: user tower ``user_index`` -> ``user_embedding`` FP32 [-1, D];
  ``item_tower.onnx``: ``item_index`` -> ``item_embedding``; ``item_embeddings.npy`` and the
  nearest-neighbour index over them, ``items.faiss`` (recsys/ann.py; metadata.json's ``index``).

The towers are table lookups: users without target history ("mapped") hold their EMCDR-mapped
vector. Each graph is checked with ``onnx.checker`` and against torch under ONNX Runtime (relative
error at most 1e-5) before anything is published; a failed check publishes nothing.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F

from recsys.ann import AnnParams, stage_index
from recsys.repository import (
    ITEMS_FILE,
    MODEL_FILE,
    RANKER_SIGNATURE,
    USERS_FILE,
    VersionPublisher,
    item_tower_signature,
    user_tower_signature,
    write_items,
    write_users,
)
from recsys.repository.graphs import FP32, INT8, INT8_MODEL_FILE
from recsys.sources import NEIGHBOURS_FILE
from training.errors import TrainingError
from training.quantize import int8_graph

logger = logging.getLogger(__name__)

OPSET = 17
MAX_REL_ERR = 1e-5


class ExportError(TrainingError):
    """An exported graph failed its check; nothing was published."""


class TableTower(nn.Module):
    """index -> row of a fixed table."""

    table: torch.Tensor

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.detach().float().contiguous())

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return F.embedding(index, self.table)


class DotRanker(nn.Module):
    """(user_index[i], item_index[i]) -> <user row, item row>."""

    users: torch.Tensor
    items: torch.Tensor

    def __init__(self, users: torch.Tensor, items: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("users", users.detach().float().contiguous())
        self.register_buffer("items", items.detach().float().contiguous())

    def forward(self, user_index: torch.Tensor, item_index: torch.Tensor) -> torch.Tensor:
        return (F.embedding(user_index, self.users) * F.embedding(item_index, self.items)).sum(-1)


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    inputs: list[str],
    outputs: list[str],
    path: Path,
) -> None:
    dynamic = {name: {0: "batch"} for name in inputs + outputs}
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=dynamic,
        opset_version=OPSET,
        dynamo=False,
    )


def check_graph(path: Path, module: nn.Module, feeds: dict[str, np.ndarray]) -> float:
    """onnx.checker plus ONNX Runtime vs torch; returns the max relative error or raises."""
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name}: onnx.checker failed: {exc}") from exc
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)[0]
    with torch.no_grad():
        want = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    if got.shape != want.shape:
        raise ExportError(f"{path.name}: ONNX Runtime shape {got.shape} != torch {want.shape}")
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        raise ExportError(f"{path.name}: non-finite outputs")
    # relative to the output's magnitude: a score near zero has no meaningful relative error
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    err = float(np.max(np.abs(got - want))) / max(scale, 1e-12) if want.size else 0.0
    if not err <= MAX_REL_ERR:
        raise ExportError(f"{path.name}: relative error {err:.2e} > {MAX_REL_ERR:.0e}")
    return err


def code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("recsys-transfer")
        except PackageNotFoundError:
            return "unknown"


def _write_vocabularies(directory: Path, checkpoint: dict[str, Any]) -> None:
    write_users(directory / USERS_FILE, checkpoint["users"], checkpoint["user_kinds"])
    write_items(
        directory / ITEMS_FILE,
        checkpoint["items"],
        checkpoint["titles"],
        [int(c) for c in checkpoint["popularity"]],
    )


def _base_metadata(
    checkpoint: dict[str, Any], dim: int, n_users: int, n_items: int
) -> dict[str, Any]:
    """What every published model of a checkpoint records about where it comes from."""
    return {
        "domain": checkpoint["target"],
        "source_domain": checkpoint["source"] or None,
        "opset": OPSET,
        "embedding_dim": dim,
        "dataset": {"name": checkpoint["dataset"], "fingerprint": checkpoint["fingerprint"]},
        "strategy": checkpoint["strategy"],
        "metrics": checkpoint["metrics"],
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "config": checkpoint["config"],
        "n_users": n_users,
        "n_items": n_items,
    }


def _export_and_check(
    tmp: Path,
    ranker: nn.Module,
    user_tower: nn.Module,
    item_tower: nn.Module,
    u_idx: np.ndarray,
    i_idx: np.ndarray,
    dim: int,
) -> dict[str, float]:
    """Export the ranker and both towers into `tmp` (ranker.onnx, user.onnx, item.onnx) and check
    each against torch on the sample indices; the maximum relative error of each."""
    ranker_io, user_io, item_io = (
        RANKER_SIGNATURE,
        user_tower_signature(dim),
        item_tower_signature(dim),
    )
    (user_in,), (item_in,) = user_io.input_names, item_io.input_names
    for module, sample, io, name in (
        (ranker, (u_idx[:3], i_idx[:3]), ranker_io, "ranker"),
        (user_tower, (u_idx[:3],), user_io, "user"),
        (item_tower, (i_idx[:3],), item_io, "item"),
    ):
        args = tuple(torch.from_numpy(a) for a in sample)
        _export(module, args, io.input_names, io.output_names, tmp / f"{name}.onnx")
    return {
        "ranker": check_graph(
            tmp / "ranker.onnx",
            ranker,
            dict(zip(ranker_io.input_names, (u_idx, i_idx), strict=True)),
        ),
        "user_tower": check_graph(tmp / "user.onnx", user_tower, {user_in: u_idx}),
        "item_tower": check_graph(tmp / "item.onnx", item_tower, {item_in: i_idx}),
    }


def publish(checkpoint: dict[str, Any], repository: Path, seed: int = 0) -> int:
    """Export, check and publish the two models of a checkpoint; returns the new version."""
    domain = checkpoint["target"]
    users = checkpoint["user_table"]
    items = checkpoint["item_table"]
    dim = int(users.shape[1])
    n_users, n_items = int(users.shape[0]), int(items.shape[0])
    for label, table in (("user", users), ("item", items)):
        if not torch.isfinite(table).all():
            raise ExportError(f"non-finite values in the {label} table; nothing published")
    rng = np.random.default_rng(seed)
    batch = 257
    u_idx = rng.integers(0, n_users, batch).astype(np.int64)
    i_idx = rng.integers(0, n_items, batch).astype(np.int64)
    u_idx[:2], i_idx[:2] = (0, n_users - 1), (0, n_items - 1)  # the edges of both tables

    ranker = DotRanker(users, items).eval()
    user_tower = TableTower(users).eval()
    item_tower = TableTower(items).eval()
    base_meta = _base_metadata(checkpoint, dim, n_users, n_items)
    seen = checkpoint["seen"]  # (indptr, indices)
    ranker_io = RANKER_SIGNATURE
    user_io = user_tower_signature(dim)
    item_io = item_tower_signature(dim)
    # export and check everything before staging anything
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        errors = _export_and_check(tmp, ranker, user_tower, item_tower, u_idx, i_idx, dim)
        logger.info("export checks passed, max relative errors %s", errors)
        int8 = int8_graph(
            tmp / "ranker.onnx",
            tmp / "ranker.int8.onnx",
            ranker_io.input_names,
            seen,
            n_users,
            n_items,
        )
        graphs = {FP32: MODEL_FILE} | ({INT8: INT8_MODEL_FILE} if int8.passed else {})
        ranker_name, retrieval_name = f"{domain}-ranker", f"{domain}-retrieval"
        # With a learned ranker (training/ranker.py) it is <domain>-ranker and the dot-product
        # graph is published beside it as <domain>-dot-ranker; the retrieval version then also
        # holds the item-to-item neighbour lists.
        learned = checkpoint.get("learned_ranker")
        dot_name = f"{domain}-dot-ranker" if learned else ranker_name
        names = (
            [ranker_name, dot_name, retrieval_name] if learned else [ranker_name, retrieval_name]
        )
        with VersionPublisher(repository, names) as pub:
            if learned:
                from training.ranker import stage_learned_ranker

                d = stage_learned_ranker(pub, ranker_name, retrieval_name, learned, base_meta, seed)
                _write_vocabularies(d, checkpoint)
            d = pub.describe(
                dot_name,
                kind="ranker",
                signature=ranker_io,
                metadata=base_meta
                | {
                    "export_check": {"max_relative_error": errors["ranker"]},
                    "graphs": graphs,
                    "int8_check": int8.to_json(),
                },
            )
            (d / MODEL_FILE).write_bytes((tmp / "ranker.onnx").read_bytes())
            if INT8 in graphs:
                (d / INT8_MODEL_FILE).write_bytes((tmp / "ranker.int8.onnx").read_bytes())
            _write_vocabularies(d, checkpoint)

            d = pub.describe(
                retrieval_name,
                kind="retrieval",
                signature=user_io,
                metadata=base_meta
                | {
                    "item_tower": item_io.to_json(),
                    "export_check": {
                        "max_relative_error": max(errors["user_tower"], errors["item_tower"])
                    },
                },
            )
            (d / MODEL_FILE).write_bytes((tmp / "user.onnx").read_bytes())
            (d / "item_tower.onnx").write_bytes((tmp / "item.onnx").read_bytes())
            np.save(d / "item_embeddings.npy", items.detach().float().numpy())
            # The nearest-neighbour index, built once here and memory-mapped by every pod.
            stage_index(d, AnnParams.from_mapping(checkpoint["config"], prefix="index_"))
            np.savez(d / "seen.npz", indptr=seen[0], indices=seen[1])
            if checkpoint.get("neighbours") is not None:
                checkpoint["neighbours"].save(d / NEIGHBOURS_FILE)
            _write_vocabularies(d, checkpoint)
        version = pub.version
    assert version is not None
    logger.info(
        "published %s and %s version %d to %s", ranker_name, retrieval_name, version, repository
    )
    return version


def served_tables(
    repository: Path, domain: str, version: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(user ids, user embeddings, item embeddings) of every user and item of a published
    retrieval version, computed by its own graphs under ONNX Runtime (what retrieval serves)."""
    from recsys.repository import read_users, version_dir

    d = version_dir(repository, f"{domain}-retrieval", version)
    ids = read_users(d / USERS_FILE).ids
    n_users = len(ids)
    n_items = int(np.load(d / "item_embeddings.npy", mmap_mode="r").shape[0])
    out = []
    for graph, n in ((MODEL_FILE, n_users), ("item_tower.onnx", n_items)):
        sess = ort.InferenceSession(str(d / graph), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        chunks = [
            sess.run(None, {name: np.arange(a, min(a + 4096, n), dtype=np.int64)})[0]
            for a in range(0, n, 4096)
        ]
        out.append(np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32))
    return ids, out[0], out[1]
