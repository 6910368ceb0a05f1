"""The model repository: atomic publishing of model versions and reading them back.

Layout and rules are documented in docs/model-repository.md. Training writes through
`VersionPublisher`; the ranking and retrieval services read with `list_versions`,
`read_metadata` and `verify_version`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.pbtxt"
_TMP_PREFIX = ".tmp-"


_TRITON_TYPES = {
    "INT64": "TYPE_INT64",
    "INT32": "TYPE_INT32",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
}


class RepositoryError(Exception):
    """A model repository or one of its versions is missing, malformed or inconsistent."""


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def triton_config(name: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> str:
    """A Triton config.pbtxt for an ONNX model with the given signature (metadata.json's
    `inputs`/`outputs`: name, datatype in the Open Inference Protocol's spelling, shape)."""

    def tensors(kind: str, specs: list[dict[str, Any]]) -> str:
        rows = []
        for spec in specs:
            dims = ", ".join(str(int(d)) for d in spec["shape"])
            rows.append(
                f'  {{ name: "{spec["name"]}" data_type: {_TRITON_TYPES[spec["datatype"]]}'
                f" dims: [ {dims} ] }}"
            )
        return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"

    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        + tensors("input", inputs)
        + tensors("output", outputs)
        + "version_policy: { latest: { num_versions: 1 } }\n"
    )


def list_models(root: Path) -> list[str]:
    """Names of the models in a repository (directories that are not hidden), sorted."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist or is not a directory")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_versions(root: Path, model: str) -> list[int]:
    """Published versions of a model, ascending. Half-written or foreign entries are ignored."""
    model_dir = root / model
    if not model_dir.is_dir():
        return []
    versions = []
    for entry in model_dir.iterdir():
        if entry.is_dir() and entry.name.isdigit() and int(entry.name) > 0:
            versions.append(int(entry.name))
    return sorted(versions)


def version_dir(root: Path, model: str, version: int) -> Path:
    return root / model / str(version)


def read_metadata(directory: Path) -> dict[str, Any]:
    """The parsed metadata.json of a version directory."""
    return read_json(directory / METADATA_FILE)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from one file of a version (metadata.json, users.json, items.json)."""
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise RepositoryError(f"{path} is missing") from exc
    except json.JSONDecodeError as exc:
        raise RepositoryError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RepositoryError(f"{path} must hold a JSON object")
    return data


def verify_version(directory: Path) -> dict[str, Any]:
    """Check that every file listed in metadata.json exists with its SHA-256; return the metadata."""
    metadata = read_metadata(directory)
    files = metadata.get("files")
    if not isinstance(files, dict) or not files:
        raise RepositoryError(f"{directory / METADATA_FILE} lists no files")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise RepositoryError(f"{path} is listed in metadata.json but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise RepositoryError(
                f"{path} is corrupt: SHA-256 {actual[:12]}… does not match {str(expected)[:12]}…"
            )
    return metadata


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class VersionPublisher:
    """Stages the files of several models and publishes them under one new version number.

    Each model's files are written into a hidden temporary directory inside the model's own
    directory, so the final rename stays on one file system and is atomic. Readers ignore hidden
    names, so they never see half a version.

        with VersionPublisher(repo, ["books-ranker", "books-retrieval"]) as pub:
            write_files(pub.stage("books-ranker"))
            write_files(pub.stage("books-retrieval"))
        print(pub.version)
    """

    def __init__(self, root: Path, model_names: list[str]) -> None:
        if not model_names:
            raise ValueError("at least one model name is required")
        for name in model_names:
            if not name or name.startswith(".") or "/" in name or name.isdigit():
                raise ValueError(f"invalid model name {name!r}")
        self.root = Path(root)
        self.model_names = list(model_names)
        self.version: int | None = None
        self._staged: dict[str, Path] = {}

    def stage(self, model_name: str) -> Path:
        """An empty directory to write one model's files into (model.onnx, metadata.json, ...)."""
        if model_name not in self.model_names:
            raise ValueError(f"{model_name!r} is not one of {self.model_names}")
        if model_name in self._staged:
            return self._staged[model_name]
        model_dir = self.root / model_name
        model_dir.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=model_dir))
        self._staged[model_name] = staged
        return staged

    def _next_version(self) -> int:
        existing = [v for name in self.model_names for v in list_versions(self.root, name)]
        return max(existing, default=0) + 1

    def _finalize_metadata(self, model_name: str, staged: Path, version: int) -> None:
        metadata = read_metadata(staged)
        metadata["name"] = model_name
        metadata["version"] = version
        metadata["files"] = {
            str(p.relative_to(staged)): sha256_file(p)
            for p in sorted(staged.rglob("*"))
            if p.is_file() and p.name != METADATA_FILE
        }
        with (staged / METADATA_FILE).open("w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
            f.write("\n")

    def commit(self) -> int:
        """Publish every staged model under one new version; returns the version number."""
        missing = [name for name in self.model_names if name not in self._staged]
        if missing:
            raise RepositoryError(f"nothing staged for {missing}")
        for _ in range(100):
            version = self._next_version()
            targets = {name: version_dir(self.root, name, version) for name in self.model_names}
            if any(t.exists() for t in targets.values()):
                continue
            for name, staged in self._staged.items():
                self._finalize_metadata(name, staged, version)
                _fsync_tree(staged)
            published: list[str] = []
            try:
                for name, staged in self._staged.items():
                    staged.rename(targets[name])
                    published.append(name)
            except OSError:
                # Another publisher took this number between the check and the rename: move
                # back what was already renamed and try the next number.
                for name in published:
                    targets[name].rename(self._staged[name])
                continue
            for name in self.model_names:
                config = targets[name] / CONFIG_FILE
                if config.is_file():
                    tmp = config.parent.parent / f"{_TMP_PREFIX}{CONFIG_FILE}"
                    shutil.copyfile(config, tmp)
                    tmp.replace(config.parent.parent / CONFIG_FILE)
            self.version = version
            self._staged = {}
            logger.info("Published %s version %d to %s", self.model_names, version, self.root)
            return version
        raise RepositoryError(f"could not find a free version number for {self.model_names}")

    def abort(self) -> None:
        """Remove everything staged; nothing is published."""
        for staged in self._staged.values():
            shutil.rmtree(staged, ignore_errors=True)
        self._staged = {}

    def __enter__(self) -> VersionPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
