"""Stored retrieval indexes (recsys/ann.py): the type chosen by catalogue size, built at publish,
memory-mapped at load, the same answers as an index built in-process, and refused (the served
version kept) when corrupt or built for other items."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest

from devtools.tiny_models import TinyModel, make_tiny_model, publish_tiny_model
from recsys import ann
from recsys.ann import AnnParams
from recsys.repository import (
    METADATA_FILE,
    READY_FILE,
    VersionPublisher,
    sha256_file,
    version_dir,
)
from serving.retrieval.config import RetrievalSettings
from serving.retrieval.index import IndexOptions, RetrievalIndex
from serving.retrieval.server import build_manager
from training.config import Config
from training.errors import ConfigError

RETRIEVAL = "books-retrieval"
# On 400 items: flat up to 500, HNSW up to 1000 (above 100), IVF fast-scan PQ above 200; the
# 8-bit IVF-PQ of earlier versions only when asked for.
IVF = AnnParams(exact_max_items=100, hnsw_max_items=200, ivf_nlist=8, ivf_nprobe=8)
PARAMS = {ann.FLAT: AnnParams(), ann.HNSW: AnnParams(exact_max_items=100), ann.IVFPQ_FS: IVF}
PARAMS[ann.IVFPQ] = replace(IVF, pq_m=16)  # as those versions were built


def mapped_files() -> set[str]:
    """Paths of the files this process has memory-mapped."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split()) == 6}


def brute_force(model: TinyModel, row: int, k: int) -> list[str]:
    scores = model.item_emb @ model.user_emb[row]
    return [model.item_ids[j] for j in np.argsort(-scores, kind="stable")[:k]]


def test_the_index_type_follows_the_catalogue_size() -> None:
    params = AnnParams(exact_max_items=1_000, hnsw_max_items=100_000)
    assert [ann.choose_kind(n, params) for n in (1, 1_000, 1_001, 100_000, 100_001)] == [
        "flat",
        "flat",
        "hnsw",
        "hnsw",
        "ivfpqfs",
    ]
    defaults = AnnParams()
    assert ann.choose_kind(400_000, defaults) == "hnsw"
    assert ann.choose_kind(1_000_000, defaults) == "ivfpqfs"
    assert ann.nlist_for(10_000_000, defaults) == 16_384  # 4 sqrt(n) = 12 649
    assert ann.nlist_for(1_000_000, defaults) == 4096
    assert ann.nlist_for(1_000, defaults) == 128
    assert ann.nlist_for(100, defaults) == 64  # at least 64 lists
    assert ann.nlist_for(10_000, AnnParams(ivf_nlist=100)) == 100
    assert ann.nprobe_for(16_384, defaults) == 2048  # an eighth of the lists
    assert ann.nprobe_for(8, AnnParams(ivf_nprobe=64)) == 8  # at most every list
    assert ann.stored_width("ivfpqfs", 64, defaults) == 64  # inner products: no extra column
    assert ann.stored_width("ivfpqfs", 40, defaults) == 64  # padded to a multiple of pq_m
    assert ann.stored_width("ivfpq", 64, AnnParams(pq_m=16)) == 80  # 65 padded likewise
    with pytest.raises(ValueError, match="hnsw_max_items"):
        AnnParams(exact_max_items=10, hnsw_max_items=5).checked()


def test_the_retrieval_service_searches_with_the_index_defaults() -> None:
    """The service's settings and the index builder's parameters have one set of defaults (the
    service's search parameters apply to every version it loads)."""
    settings = RetrievalSettings()
    defaults = AnnParams()
    assert (settings.hnsw_ef_search, settings.rerank_factor) == (
        defaults.hnsw_ef_search,
        defaults.rerank_factor,
    )
    assert (settings.exact_search_max_items, settings.hnsw_max_items) == (
        defaults.exact_max_items,
        defaults.hnsw_max_items,
    )
    assert (settings.hnsw_m, settings.hnsw_ef_construction) == (
        defaults.hnsw_m,
        defaults.hnsw_ef_construction,
    )
    assert IndexOptions().ann_params() == defaults


def test_training_settings_name_the_bad_index_parameter() -> None:
    assert Config().index_params() == AnnParams()
    assert Config(index_hnsw_max_items=2_000_000).index_params().hnsw_max_items == 2_000_000
    with pytest.raises(ConfigError, match="index_pq_m"):
        Config(index_pq_m=0).validate()


@pytest.mark.parametrize("kind", list(PARAMS))
def test_a_stored_index_is_mapped_and_answers_as_one_built_in_process(
    tmp_path: Path, kind: str
) -> None:
    # Chosen by size, but for the 8-bit IVF-PQ that only versions published before hold.
    forced = kind if kind == ann.IVFPQ else None
    model = publish_tiny_model(
        tmp_path, make_tiny_model(n_items=400), index=PARAMS[kind], index_kind=forced
    )
    directory = version_dir(tmp_path, RETRIEVAL, model.version)
    metadata = json.loads((directory / METADATA_FILE).read_text())
    section = metadata["index"]
    assert section["kind"] == kind and section["ntotal"] == 400 and section["dim"] == 8
    assert section["sha256"] == metadata["files"]["items.faiss"]
    assert section["embeddings_sha256"] == metadata["files"]["item_embeddings.npy"]

    faiss.omp_set_num_threads(1)  # the same build as at publish, thread for thread
    # The service's defaults would pick an exact index for 400 items: the stored one wins.
    loaded = RetrievalIndex.load(directory, RETRIEVAL, IndexOptions(ivf_nprobe=8))
    assert loaded.ann.stored and loaded.index_kind == kind
    files = mapped_files()
    # Fast-scan codes are read into memory (FAISS maps no blocked inverted lists).
    assert loaded.ann.mmapped == (kind != ann.IVFPQ_FS)
    assert (str(directory / "items.faiss") in files) == loaded.ann.mmapped
    assert str(directory / "item_embeddings.npy") in files

    if kind in ann.IVF_KINDS:  # the service's 8 probes; its default (0) keeps the version's
        assert loaded.ann.nprobe == 8
        default = RetrievalIndex.load(directory, RETRIEVAL, IndexOptions(ivf_nprobe=0))
        assert default.ann.nprobe == PARAMS[kind].ivf_nprobe == 8
    built = ann.build(model.item_emb, PARAMS[kind], forced)
    assert built.kind == kind and not built.stored
    hits = 0
    for row in range(20):
        rows, scores = loaded.ann.search(model.user_emb[row], 50)
        again_rows, again_scores = built.search(model.user_emb[row], 50)
        np.testing.assert_array_equal(rows, again_rows)
        np.testing.assert_allclose(scores, again_scores, rtol=1e-6)
        got = [c.item_id for c in loaded.retrieve(model.user_ids[row], 50).candidates]
        hits += len(set(got) & set(brute_force(model, row, 50)))
    assert hits / (20 * 50) >= 0.9
    if kind == ann.FLAT:
        assert hits == 20 * 50


def test_fast_scan_ivf_finds_planted_neighbours_with_their_exact_scores() -> None:
    rng = np.random.default_rng(3)
    items = rng.normal(size=(3000, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    planted = rng.choice(3000, size=40, replace=False)
    items[planted] = 4 * queries  # far the largest inner product with its query
    index = ann.build(items, AnnParams(exact_max_items=0, hnsw_max_items=0, ivf_nlist=16))
    assert index.kind == ann.IVFPQ_FS and isinstance(index.index, faiss.IndexIVFPQFastScan)
    for query, item in zip(queries, planted, strict=True):
        rows, scores = index.search(query, 20)
        assert rows[0] == item
        np.testing.assert_allclose(scores, items[rows] @ query, rtol=1e-5)
        assert (np.diff(scores) <= 0).all()


def test_an_ivf_index_records_the_lists_and_probes_it_was_built_with() -> None:
    """A version states the nlist and nprobe its defaults (0) stood for when it was built, so a
    later change of the defaults does not change how it is searched."""
    items = np.random.default_rng(4).normal(size=(5000, 16)).astype(np.float32)
    index = ann.build(items, AnnParams(exact_max_items=0, hnsw_max_items=0))
    expected_nlist = ann.nlist_for(5000, AnnParams())
    assert expected_nlist == 256  # 4 sqrt(5000) = 283
    assert (index.params.ivf_nlist, index.params.ivf_nprobe) == (expected_nlist, 32)
    assert faiss.extract_index_ivf(index.index).nlist == 256 and index.nprobe == 32
    assert ann.describe(index, 16, "", "")["params"]["ivf_nprobe"] == 32


def test_a_version_without_a_stored_index_builds_one_at_load(tmp_path: Path) -> None:
    model = publish_tiny_model(tmp_path, make_tiny_model(n_items=400), index=None)
    directory = version_dir(tmp_path, RETRIEVAL, model.version)
    assert not (directory / "items.faiss").exists()
    loaded = RetrievalIndex.load(directory, RETRIEVAL, IndexOptions(exact_search_max_items=100))
    assert not loaded.ann.stored and loaded.index_kind == "hnsw"
    row = model.user_ids.index("u3")
    got = [c.item_id for c in loaded.retrieve("u3", 10).candidates]
    assert len(set(got) & set(brute_force(model, row, 10))) >= 9


def republish(repo: Path, source: Path, files: dict[str, bytes], index: dict | None = None) -> int:
    """A new retrieval version: the files of `source`, some replaced, its index section updated
    (checksums are the publisher's, so only the index checks can find the fault)."""
    metadata = json.loads((source / METADATA_FILE).read_text())
    for key in ("files", "name", "version"):
        metadata.pop(key)
    signature = metadata.pop("inputs"), metadata.pop("outputs")
    with VersionPublisher(repo, [RETRIEVAL]) as pub:
        staged = pub.stage(RETRIEVAL)
        for path in source.iterdir():
            if path.name not in (METADATA_FILE, READY_FILE, "config.pbtxt"):
                shutil.copy(path, staged / path.name)
        for name, data in files.items():
            (staged / name).write_bytes(data)
        section = metadata["index"]
        section.update(index or {})
        if "items.faiss" in files and "sha256" not in (index or {}):
            section["sha256"] = sha256_file(staged / "items.faiss")
        metadata["inputs"], metadata["outputs"] = signature
        (staged / METADATA_FILE).write_text(json.dumps(metadata))
    assert pub.version is not None
    return pub.version


def other_index(n_items: int, dim: int) -> bytes:
    index = faiss.IndexFlatIP(dim)
    index.add(np.random.default_rng(0).normal(size=(n_items, dim)).astype(np.float32))
    return faiss.serialize_index(index).tobytes()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"files": {"items.faiss": b"not a faiss index"}}, "cannot be read by FAISS"),
        ({"files": {"items.faiss": other_index(399, 8)}}, "holds 399 vectors"),
        ({"files": {"items.faiss": other_index(400, 7)}}, "of width 7"),
        ({"files": {}, "index": {"embeddings_sha256": "0" * 64}}, "other item embeddings"),
        ({"files": {}, "index": {"ntotal": 401}}, "metadata says 401 items"),
        ({"files": {}, "index": {"sha256": "0" * 64}}, "not the one recorded"),
        ({"files": {}, "index": {"kind": "lsh"}}, "unknown index kind"),
        ({"files": {}, "index": {"kind": "ivfpqfs"}}, "expected a ivfpqfs index"),
    ],
)
def test_a_corrupt_or_mismatched_index_is_refused_and_the_served_version_stays(
    tmp_path: Path, change: dict, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = publish_tiny_model(tmp_path, make_tiny_model(n_items=400))
    good = version_dir(tmp_path, RETRIEVAL, model.version)
    manager = build_manager(RetrievalSettings(model_repository=tmp_path, poll_interval_s=0))
    assert manager.refresh()
    assert manager.get("books").version == model.version
    bad = republish(tmp_path, good, change["files"], change.get("index"))
    assert not manager.refresh()
    assert manager.get("books").version == model.version
    failure = manager.follower.failures(RETRIEVAL)[bad]
    assert reason in failure.reason and "items.faiss" in failure.reason
    assert any(reason in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_an_index_changed_after_publish_fails_its_checksum(tmp_path: Path) -> None:
    model = publish_tiny_model(tmp_path, make_tiny_model(n_items=400))
    first = version_dir(tmp_path, RETRIEVAL, model.version)
    manager = build_manager(RetrievalSettings(model_repository=tmp_path, poll_interval_s=0))
    assert manager.refresh()
    newer = publish_tiny_model(tmp_path, make_tiny_model(n_items=400, seed=1))
    (version_dir(tmp_path, RETRIEVAL, newer.version) / "items.faiss").write_bytes(
        (first / "items.faiss").read_bytes()
    )
    assert not manager.refresh()
    assert manager.get("books").version == model.version
    assert "SHA-256" in manager.follower.failures(RETRIEVAL)[newer.version].reason


def test_without_the_mapping_flag_the_index_is_read_into_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = publish_tiny_model(tmp_path, make_tiny_model(n_items=400), index=PARAMS[ann.HNSW])
    directory = version_dir(tmp_path, RETRIEVAL, model.version)
    mapped = RetrievalIndex.load(directory, RETRIEVAL, IndexOptions())
    monkeypatch.delattr(faiss, "IO_FLAG_MMAP_IFC")  # a FAISS older than 1.10
    read = RetrievalIndex.load(directory, RETRIEVAL, IndexOptions())
    assert mapped.ann.mmapped and not read.ann.mmapped and read.ann.stored
    assert read.retrieve("u1", 30).candidates == mapped.retrieve("u1", 30).candidates
