"""The model repository: atomic publishing (one model or several), modes, leftovers, version
names, verified reads, the item catalogue and the Triton configuration."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from devtools.processes import project_env
from devtools.tiny_models import make_tiny_model, publish_tiny_model
from recsys.repository import (
    RANKER_SIGNATURE,
    RepositoryError,
    VersionPublisher,
    list_models,
    list_versions,
    parse_version_name,
    read_items,
    read_users,
    scan_versions,
    triton_config,
    user_tower_signature,
    verify_version,
    version_dir,
    write_items,
    write_users,
)
from recsys.repository import publish as publish_module


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


def test_version_directories_are_ascii_positive_integers(tmp_path: Path) -> None:
    with VersionPublisher(tmp_path, ["a-ranker"]) as pub:
        _stage(pub, "a-ranker")
    for name in ("²", "٣", "07", "0", "-1", "x"):
        (tmp_path / "a-ranker" / name).mkdir()
    scan = scan_versions(tmp_path, "a-ranker")
    assert scan.published == (1,)
    assert sorted(scan.invalid) == sorted(["²", "٣", "07", "0", "-1", "x"])
    assert list_versions(tmp_path, "a-ranker") == [1]
    assert parse_version_name("12") == 12
    assert [parse_version_name(t) for t in ("²", "٣", "07", "0", " 1", "1e3")] == [None] * 6


def test_published_files_are_readable_by_every_uid(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, make_tiny_model())
    for model in ("books-ranker", "books-retrieval"):
        root = tmp_path / model
        assert stat.S_IMODE(root.stat().st_mode) == 0o755
        assert stat.S_IMODE((root / "config.pbtxt").stat().st_mode) == 0o644
        version = root / "1"
        assert stat.S_IMODE(version.stat().st_mode) == 0o755
        files = [p for p in version.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"model.onnx", "metadata.json", "READY"}
        assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


# The child loads both versions once as root first, so that every lazy import is done before it
# drops to uid/gid 65534: the interpreter may live where only root can read (/root/.pyenv).
_LOAD_AS_NOBODY = """
import os
import sys
from pathlib import Path
from serving.ranking.model import CPU, RankerModel, SessionOptions
from serving.retrieval.index import IndexOptions, RetrievalIndex
from recsys.repository import list_versions, version_dir

repo = Path(sys.argv[1])
options = SessionOptions(providers=(CPU,), intra_op_threads=1, warmup_candidates=8)

def load():
    assert list_versions(repo, "books-ranker") == [1], list_versions(repo, "books-ranker")
    ranker = RankerModel.load("books-ranker", 1, version_dir(repo, "books-ranker", 1), options)
    index = RetrievalIndex.load(
        version_dir(repo, "books-retrieval", 1), "books-retrieval", IndexOptions()
    )
    return ranker.n_items, index.n_items

load()
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
print("loaded as uid", os.getuid(), *load())
"""


@pytest.mark.skipif(
    os.geteuid() != 0, reason="publishing as one uid and loading as another needs root"
)
def test_a_version_published_by_one_uid_loads_as_another() -> None:
    # Not under pytest's tmp_path: its parents are private to root.
    base = Path(tempfile.mkdtemp(prefix="repo-uid-"))
    try:
        os.chmod(base, 0o755)
        with _umask(0o077):  # a strict publisher umask must not leak into the repository
            publish_tiny_model(base, make_tiny_model())
        result = subprocess.run(
            [sys.executable, "-c", _LOAD_AS_NOBODY, str(base)],
            capture_output=True,
            text=True,
            timeout=120,
            env=project_env(),
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "loaded as uid 65534 120 120" in result.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_a_multi_model_publish_is_visible_all_at_once_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = publish_module.write_ready
    written: list[str] = []

    def dies_after_the_first(directory: Path, version: int, models: Sequence[str]) -> None:
        if written:
            raise KeyboardInterrupt("killed between the two markers")
        real(directory, version, models)
        written.append(directory.parent.name)

    monkeypatch.setattr(publish_module, "write_ready", dies_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        with VersionPublisher(tmp_path, ["a-ranker", "a-retrieval"]) as pub:
            _stage(pub, "a-ranker")
            _stage(pub, "a-retrieval")
    assert written == ["a-ranker"]
    assert (tmp_path / "a-ranker" / "1" / "READY").is_file()
    # Half a publish is no publish: neither model shows version 1.
    assert (
        list_versions(tmp_path, "a-ranker") == [] and list_versions(tmp_path, "a-retrieval") == []
    )
    monkeypatch.setattr(publish_module, "write_ready", real)
    with VersionPublisher(tmp_path, ["a-ranker", "a-retrieval"]) as pub:
        _stage(pub, "a-ranker")
        _stage(pub, "a-retrieval")
    assert pub.version == 2
    assert list_versions(tmp_path, "a-ranker") == [2] and list_versions(
        tmp_path, "a-retrieval"
    ) == [2]


def test_leftovers_of_a_dead_publisher_are_cleaned_on_the_next_publish(tmp_path: Path) -> None:
    model_dir = tmp_path / "a-ranker"
    model_dir.mkdir()
    dead_dir = model_dir / ".tmp-dead"
    dead_dir.mkdir()
    (dead_dir / "model.onnx").write_bytes(b"half")
    dead_file = model_dir / ".tmp-config"
    dead_file.write_text("x")
    live = VersionPublisher(tmp_path, ["a-ranker"])
    _stage(live, "a-ranker")
    live_dir = live._staged["a-ranker"]
    old = time.time() - 2 * 3600
    for path in (dead_dir, dead_file, live_dir):
        os.utime(path, (old, old))
    young = model_dir / ".tmp-young"
    young.mkdir()  # maybe a publisher that has not locked it yet
    with VersionPublisher(tmp_path, ["a-ranker"]) as pub:
        _stage(pub, "a-ranker")
    names = {p.name for p in model_dir.iterdir()}
    assert ".tmp-dead" not in names and ".tmp-config" not in names
    assert live_dir.name in names and ".tmp-young" in names  # a live publisher keeps its work
    assert live.commit() == 2
    assert list_versions(tmp_path, "a-ranker") == [1, 2]


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        ({"ids": ["a", "b"], "titles": 5}, "'titles' must be a list"),
        ({"ids": ["a", "b"], "titles": ["x", 3]}, "every title"),
        ({"ids": ["a", "b"], "popularity": "many"}, "'popularity' must be a list"),
        ({"ids": ["a", "b"], "popularity": [1, float("nan")]}, "finite"),
        ({"ids": ["a", "b"], "popularity": [1, True]}, "finite"),
        ({"ids": ["a", "b"], "popularity": [1]}, "as long as"),
        ({"ids": "ab"}, "'ids' must be"),
        ({"ids": ["a", 1]}, "'ids' must be"),
        ({"ids": ["a", "a"]}, "duplicates"),
        ([1, 2], "JSON object"),
    ],
)
def test_malformed_item_catalogues_are_refused(tmp_path: Path, items: object, needle: str) -> None:
    path = tmp_path / "items.json"
    path.write_text(json.dumps(items))
    with pytest.raises(RepositoryError, match=re.escape(needle)):
        read_items(path)


def test_item_catalogue_defaults_and_user_kinds(tmp_path: Path) -> None:
    write_items(tmp_path / "items.json", ["a", "b"], [None, "B"], [3, 0])
    items = read_items(tmp_path / "items.json")
    assert items.titles == ["", "B"] and items.popularity == [3.0, 0.0]
    (tmp_path / "bare.json").write_text(json.dumps({"ids": ["a"]}))
    assert read_items(tmp_path / "bare.json").popularity == [0.0]
    write_users(tmp_path / "users.json", ["u", "v"], ["target", "mapped"])
    assert read_users(tmp_path / "users.json").kinds == ["target", "mapped"]
    (tmp_path / "users.json").write_text(json.dumps({"ids": ["u"], "kinds": ["alien"]}))
    with pytest.raises(RepositoryError, match="kind"):
        read_users(tmp_path / "users.json")


# Triton's own ModelConfig message, in a child process: tritonclient.grpc registers the
# "inference" protobuf package, which the ranker's generated stubs register too.
_PARSE_WITH_TRITON = """
import json
import sys
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

out = []
for path in sys.argv[1:]:
    with open(path) as f:
        config = text_format.Parse(f.read(), model_config_pb2.ModelConfig())
    out.append(json_format.MessageToDict(config))
print(json.dumps(out))
"""


def test_the_triton_config_is_a_valid_triton_model_config(tmp_path: Path) -> None:
    signatures = {"books-ranker": RANKER_SIGNATURE, "books-retrieval": user_tower_signature(8)}
    paths = []
    for name, signature in signatures.items():
        paths.append(tmp_path / f"{name}.pbtxt")
        paths[-1].write_text(triton_config(name, signature))
    result = subprocess.run(
        [sys.executable, "-c", _PARSE_WITH_TRITON, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        env=project_env(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ranker, retrieval = json.loads(result.stdout)
    for config, (name, signature) in zip((ranker, retrieval), signatures.items(), strict=True):
        assert config["name"] == name and config["backend"] == "onnxruntime"
        assert [t["name"] for t in config["input"]] == signature.input_names
        assert [t["name"] for t in config["output"]] == signature.output_names
        assert config["maxBatchSize"] > 0 and "dynamicBatching" in config
    assert [t["dataType"] for t in ranker["input"]] == ["TYPE_INT64", "TYPE_INT64"]
    assert ranker["input"][0]["dims"] == ["1"] and "reshape" in ranker["input"][0]
    assert ranker["output"][0]["dataType"] == "TYPE_FP32"
    assert retrieval["output"][0]["dims"] == ["8"]


def test_training_and_tiny_models_write_the_same_config(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, make_tiny_model())
    written = (tmp_path / "books-ranker" / "1" / "config.pbtxt").read_text()
    assert written == triton_config("books-ranker", RANKER_SIGNATURE)
    assert (tmp_path / "books-ranker" / "config.pbtxt").read_text() == written
