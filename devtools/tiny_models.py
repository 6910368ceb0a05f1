"""Small ranker and retrieval models with planted tastes, published into a model repository in
the layout training uses (docs/model-repository.md), so the services can be tested on their own.

Users and items belong to `clusters` taste groups; a user's embedding points at its group, so the
best items for a user are the items of its group. Users "c*" are cold-start users ("mapped"): they
have no target-domain history but a representation (here, their group's direction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from recsys.ann import AnnParams, stage_index
from recsys.repository import (
    ITEMS_FILE,
    MODEL_FILE,
    RANKER_SIGNATURE,
    USERS_FILE,
    Signature,
    VersionPublisher,
    item_tower_signature,
    user_tower_signature,
    write_items,
    write_users,
)
from recsys.repository.layout import ITEM_INPUT, SCORE_OUTPUT, USER_INPUT

OPSET = 17
DEFAULT_INDEX = AnnParams()  # as training builds it
RANKER_INPUTS = RANKER_SIGNATURE.to_json()["inputs"]
RANKER_OUTPUTS = RANKER_SIGNATURE.to_json()["outputs"]


@dataclass
class TinyModel:
    """What was published, so tests can compute expected answers directly."""

    domain: str
    version: int
    user_ids: list[str]
    user_kinds: list[str]
    item_ids: list[str]
    titles: list[str]
    user_emb: np.ndarray
    item_emb: np.ndarray
    user_cluster: np.ndarray
    item_cluster: np.ndarray
    seen: dict[int, list[int]] = field(default_factory=dict)
    popularity: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def scores(self, user_id: str, item_ids: list[str]) -> np.ndarray:
        u = self.user_emb[self.user_ids.index(user_id)]
        rows = [self.item_ids.index(i) for i in item_ids]
        return (self.item_emb[rows] @ u).astype(np.float32)


def _gather_graph(
    name: str, table: np.ndarray, index_name: str, output_name: str
) -> onnx.ModelProto:
    """index INT64 [N] -> rows of `table` FP32 [N, D]."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", index_name], [output_name], axis=0)],
        name,
        [helper.make_tensor_value_info(index_name, TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", table.shape[1]])],
        initializer=[numpy_helper.from_array(table.astype(np.float32), "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def ranker_graph(user_emb: np.ndarray, item_emb: np.ndarray) -> onnx.ModelProto:
    """score[i] = <U[user_index[i]], V[item_index[i]]>."""
    nodes = [
        helper.make_node("Gather", ["U", USER_INPUT], ["u"], axis=0),
        helper.make_node("Gather", ["V", ITEM_INPUT], ["v"], axis=0),
        helper.make_node("Mul", ["u", "v"], ["uv"]),
        helper.make_node("ReduceSum", ["uv", "axes"], [SCORE_OUTPUT], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_ranker",
        [
            helper.make_tensor_value_info(USER_INPUT, TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info(ITEM_INPUT, TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, ["N"])],
        initializer=[
            numpy_helper.from_array(user_emb.astype(np.float32), "U"),
            numpy_helper.from_array(item_emb.astype(np.float32), "V"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def make_tiny_model(
    domain: str = "books",
    *,
    n_users: int = 40,
    n_cold: int = 6,
    n_items: int = 120,
    clusters: int = 4,
    dim: int = 8,
    seed: int = 0,
) -> TinyModel:
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:clusters] * 2.0
    user_cluster = np.arange(n_users + n_cold) % clusters
    item_cluster = np.arange(n_items) % clusters
    user_emb = centers[user_cluster] + 0.1 * rng.normal(size=(n_users + n_cold, dim))
    item_emb = centers[item_cluster] + 0.3 * rng.normal(size=(n_items, dim))
    user_ids = [f"u{i}" for i in range(n_users)] + [f"c{i}" for i in range(n_cold)]
    kinds = ["target"] * n_users + ["mapped"] * n_cold
    item_ids = [f"i{j}" for j in range(n_items)]
    titles = [f"Item {j} (taste {item_cluster[j]})" for j in range(n_items)]
    seen: dict[int, list[int]] = {}
    for u in range(n_users):
        own = np.flatnonzero(item_cluster == user_cluster[u])
        seen[u] = sorted(rng.choice(own, size=3, replace=False).tolist())
    popularity = np.zeros(n_items, dtype=np.int64)
    for items in seen.values():
        popularity[items] += 1
    return TinyModel(
        domain=domain,
        version=0,
        user_ids=user_ids,
        user_kinds=kinds,
        item_ids=item_ids,
        titles=titles,
        user_emb=user_emb.astype(np.float32),
        item_emb=item_emb.astype(np.float32),
        user_cluster=user_cluster,
        item_cluster=item_cluster,
        seen=seen,
        popularity=popularity,
    )


def _metadata(model: TinyModel) -> dict:
    return {
        "domain": model.domain,
        "source_domain": "movies",
        "opset": OPSET,
        "embedding_dim": int(model.user_emb.shape[1]),
        "dataset": {"name": "tiny-planted", "fingerprint": "test"},
        "strategy": "planted",
        "metrics": {},
        "created_at": "2026-01-01T00:00:00Z",
        "code_version": "test",
    }


def write_vocabularies(directory: Path, model: TinyModel) -> None:
    """users.json and items.json of a tiny model, through the repository's writers."""
    write_users(directory / USERS_FILE, model.user_ids, model.user_kinds)
    write_items(directory / ITEMS_FILE, model.item_ids, model.titles, model.popularity.tolist())


def publish_tiny_model(
    repo: Path,
    model: TinyModel,
    index: AnnParams | None = DEFAULT_INDEX,
    index_kind: str | None = None,
) -> TinyModel:
    """Publish `<domain>-ranker` and `<domain>-retrieval` under one new version, the retrieval
    model with its stored index as training writes it (`index=None`: without, as versions
    published before items.faiss; `index_kind`: that kind instead of the one chosen by size)."""
    ranker_name, retrieval_name = f"{model.domain}-ranker", f"{model.domain}-retrieval"
    dim = int(model.user_emb.shape[1])
    with VersionPublisher(repo, [ranker_name, retrieval_name]) as pub:
        d = pub.describe(
            ranker_name, kind="ranker", signature=RANKER_SIGNATURE, metadata=_metadata(model)
        )
        onnx.save(ranker_graph(model.user_emb, model.item_emb), d / MODEL_FILE)
        write_vocabularies(d, model)

        user_io, item_io = user_tower_signature(dim), item_tower_signature(dim)
        d = pub.describe(
            retrieval_name,
            kind="retrieval",
            signature=user_io,
            metadata=_metadata(model) | {"item_tower": item_io.to_json()},
        )
        (user_in,), (user_out,) = user_io.input_names, user_io.output_names
        (item_in,), (item_out,) = item_io.input_names, item_io.output_names
        onnx.save(_gather_graph("user_tower", model.user_emb, user_in, user_out), d / MODEL_FILE)
        onnx.save(
            _gather_graph("item_tower", model.item_emb, item_in, item_out), d / "item_tower.onnx"
        )
        np.save(d / "item_embeddings.npy", model.item_emb)
        if index is not None:
            stage_index(d, index, index_kind)
        indptr = [0]
        indices: list[int] = []
        for u in range(len(model.user_ids)):
            indices.extend(model.seen.get(u, []))
            indptr.append(len(indices))
        np.savez(
            d / "seen.npz",
            indptr=np.asarray(indptr, dtype=np.int64),
            indices=np.asarray(indices, dtype=np.int64),
        )
        write_vocabularies(d, model)
    assert pub.version is not None
    model.version = pub.version
    return model


def publish_corrupt_version(repo: Path, model_name: str) -> int:
    """Publish a version of `model_name` whose model.onnx is not an ONNX graph (hashes match, so
    only loading it can find the fault)."""
    return publish_files(repo, model_name, {MODEL_FILE: b"this is not an onnx graph"})


def publish_files(
    repo: Path,
    model_name: str,
    files: dict[str, bytes],
    *,
    signature: Signature = RANKER_SIGNATURE,
    kind: str = "ranker",
) -> int:
    """Publish a version holding `files` beside a one-user, one-item vocabulary (a given
    users.json or items.json replaces it): for versions that are wrong in one known way."""
    with VersionPublisher(repo, [model_name]) as pub:
        d = pub.describe(model_name, kind=kind, signature=signature, metadata={"opset": OPSET})
        write_users(d / USERS_FILE, ["u0"])
        write_items(d / ITEMS_FILE, ["i0"])
        for name, data in files.items():
            (d / name).write_bytes(data)
    assert pub.version is not None
    return pub.version
