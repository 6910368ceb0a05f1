"""The model repository: atomic publishing, version listing, verified reads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from devtools.tiny_models import make_tiny_model, publish_tiny_model
from recsys.repository import (
    RepositoryError,
    VersionPublisher,
    list_models,
    list_versions,
    verify_version,
    version_dir,
)


def _stage(pub: VersionPublisher, name: str) -> None:
    d = pub.stage(name)
    (d / "model.onnx").write_bytes(b"graph")
    (d / "config.pbtxt").write_text(f'name: "{name}"')
    (d / "metadata.json").write_text(json.dumps({"kind": "ranker"}))


def test_publish_assigns_one_version_to_every_model(tmp_path: Path) -> None:
    for expected in (1, 2):
        with VersionPublisher(tmp_path, ["a-ranker", "a-retrieval"]) as pub:
            _stage(pub, "a-ranker")
            _stage(pub, "a-retrieval")
        assert pub.version == expected
    assert list_models(tmp_path) == ["a-ranker", "a-retrieval"]
    assert list_versions(tmp_path, "a-ranker") == [1, 2]
    meta = verify_version(version_dir(tmp_path, "a-retrieval", 2))
    assert meta["name"] == "a-retrieval" and meta["version"] == 2
    assert set(meta["files"]) == {"model.onnx", "config.pbtxt"}
    assert (tmp_path / "a-ranker" / "config.pbtxt").is_file()  # where Triton reads it


def test_failed_publish_leaves_nothing_visible(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with VersionPublisher(tmp_path, ["a-ranker"]) as pub:
            _stage(pub, "a-ranker")
            raise RuntimeError("export check failed")
    assert list_versions(tmp_path, "a-ranker") == []
    assert [p.name for p in (tmp_path / "a-ranker").iterdir()] == []


def test_staged_versions_are_invisible_until_commit(tmp_path: Path) -> None:
    pub = VersionPublisher(tmp_path, ["a-ranker"])
    _stage(pub, "a-ranker")
    assert list_versions(tmp_path, "a-ranker") == []
    assert pub.commit() == 1
    assert list_versions(tmp_path, "a-ranker") == [1]


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    versions: list[int] = []
    lock = threading.Lock()

    def publish() -> None:
        with VersionPublisher(tmp_path, ["a-ranker"]) as pub:
            _stage(pub, "a-ranker")
        with lock:
            versions.append(pub.version or 0)

    threads = [threading.Thread(target=publish) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    assert list_versions(tmp_path, "a-ranker") == [1, 2, 3, 4, 5, 6]


def test_verify_detects_corruption(tmp_path: Path) -> None:
    with VersionPublisher(tmp_path, ["a-ranker"]) as pub:
        _stage(pub, "a-ranker")
    d = version_dir(tmp_path, "a-ranker", 1)
    (d / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(RepositoryError, match="corrupt"):
        verify_version(d)
    (d / "model.onnx").unlink()
    with pytest.raises(RepositoryError, match="missing"):
        verify_version(d)


def test_tiny_models_follow_the_contract(tmp_path: Path) -> None:
    model = publish_tiny_model(tmp_path, make_tiny_model())
    d = version_dir(tmp_path, "books-ranker", model.version)
    meta = verify_version(d)
    session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i["name"] for i in meta["inputs"]]
    users = np.array([0, 0, 5], dtype=np.int64)
    items = np.array([1, 2, 3], dtype=np.int64)
    (scores,) = session.run(None, {"user_index": users, "item_index": items})
    expected = np.einsum("ij,ij->i", model.user_emb[users], model.item_emb[items])
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    verify_version(version_dir(tmp_path, "books-retrieval", model.version))
