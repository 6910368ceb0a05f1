"""Publishing model versions: stage, check, rename into place, then the READY markers last, so a
publish of several models becomes visible all at once or not at all."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from recsys.repository.layout import (
    CONFIG_FILE,
    DIR_MODE,
    FILE_MODE,
    METADATA_FILE,
    READY_FILE,
    TMP_PREFIX,
    RepositoryError,
    Signature,
    all_version_numbers,
    read_metadata,
    sha256_file,
    triton_config,
    version_dir,
    write_json,
    write_ready,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

# A hidden temporary file (not a directory) older than this is a leftover of a dead publisher.
STALE_TMP_FILE_S = 3600.0
# A staging directory is never removed this young (its publisher may not hold its lock yet).
STAGING_GRACE_S = 60.0


def _lock(directory: Path) -> int:
    """An exclusive flock on a staging directory, held while its publisher lives."""
    fd = os.open(directory, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def clean_leftovers(model_dir: Path) -> list[str]:
    """Remove the `.tmp-*` entries of publishers that died: staging directories nobody holds
    locked (and older than a minute), and temporary files older than an hour. Returns the names
    removed."""
    removed: list[str] = []
    if not model_dir.is_dir():
        return removed
    for entry in model_dir.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        try:
            age = time.time() - entry.lstat().st_mtime
            if entry.is_dir() and not entry.is_symlink():
                if age < STAGING_GRACE_S:
                    continue
                fd = os.open(entry, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live publisher is staging here
                try:
                    shutil.rmtree(entry)
                finally:
                    os.close(fd)
            elif age > STALE_TMP_FILE_S:
                entry.unlink()
            else:
                continue
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("Cannot remove the leftover %s: %s", entry, exc)
            continue
        removed.append(entry.name)
    if removed:
        logger.info("Removed leftovers of an interrupted publish in %s: %s", model_dir, removed)
    return removed


def _fix_modes_and_fsync(directory: Path) -> None:
    """Directories 0755, files 0644 (readable by a server of any uid), every file flushed."""
    for path in sorted(directory.rglob("*")):
        if path.is_dir():
            os.chmod(path, DIR_MODE)
        elif path.is_file():
            os.chmod(path, FILE_MODE)
            with path.open("rb") as f:
                os.fsync(f.fileno())
    os.chmod(directory, DIR_MODE)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionPublisher:
    """Stages the files of several models and publishes them under one new version number.

    Each model's files are written into a hidden staging directory inside the model's own
    directory, so the rename into place stays on one file system. Once every model is renamed,
    each version gets its READY marker naming all the models of the publish; readers serve a
    version only when all of them are READY, so readers see all models of a publish or none.

        with VersionPublisher(repo, ["books-ranker", "books-retrieval"]) as pub:
            d = pub.stage("books-ranker")
            ...write model.onnx, users.json, items.json...
            pub.describe("books-ranker", kind="ranker", signature=RANKER_SIGNATURE)
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
        self._locks: list[int] = []

    def stage(self, model_name: str) -> Path:
        """An empty directory to write one model's files into (model.onnx, metadata.json, ...)."""
        if model_name not in self.model_names:
            raise ValueError(f"{model_name!r} is not one of {self.model_names}")
        if model_name in self._staged:
            return self._staged[model_name]
        model_dir = self.root / model_name
        if not model_dir.is_dir():
            model_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(model_dir, DIR_MODE)
        staged = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=model_dir))
        self._locks.append(_lock(staged))
        self._staged[model_name] = staged
        return staged

    def describe(
        self,
        model_name: str,
        *,
        kind: str,
        signature: Signature,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Write a staged model's metadata.json (kind, signature and `metadata`) and its Triton
        config.pbtxt, both from the one signature. Returns the staging directory."""
        d = self.stage(model_name)
        write_json(d / METADATA_FILE, dict(metadata or {}) | {"kind": kind} | signature.to_json())
        (d / CONFIG_FILE).write_text(triton_config(model_name, signature), encoding="utf-8")
        return d

    def _next_version(self) -> int:
        used = [v for name in self.model_names for v in all_version_numbers(self.root, name)]
        return max(used, default=0) + 1

    def _finalize_metadata(self, model_name: str, staged: Path, version: int) -> None:
        metadata = read_metadata(staged)
        metadata["name"] = model_name
        metadata["version"] = version
        features = metadata.get("features")
        if isinstance(features, dict) and features.get("retrieval_model") in self.model_names:
            # A feature ranker expects the features of the retrieval version published with it.
            features["retrieval_version"] = str(version)
        metadata["files"] = {
            str(p.relative_to(staged)): sha256_file(p)
            for p in sorted(staged.rglob("*"))
            if p.is_file() and p.name not in (METADATA_FILE, READY_FILE)
        }
        write_json(staged / METADATA_FILE, metadata)

    def commit(self) -> int:
        """Publish every staged model under one new version; returns the version number."""
        missing = [name for name in self.model_names if name not in self._staged]
        if missing:
            raise RepositoryError(f"nothing staged for {missing}")
        for name in self.model_names:
            clean_leftovers(self.root / name)
        for _ in range(100):
            version = self._next_version()
            targets = {name: version_dir(self.root, name, version) for name in self.model_names}
            if any(t.exists() for t in targets.values()):
                continue
            for name, staged in self._staged.items():
                self._finalize_metadata(name, staged, version)
                _fix_modes_and_fsync(staged)
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
                _fsync_dir(targets[name].parent)
            self._mark_ready(targets, version)
            self._copy_model_configs(targets)
            self.version = version
            self._staged = {}
            self._release()
            logger.info("Published %s version %d to %s", self.model_names, version, self.root)
            return version
        raise RepositoryError(f"could not find a free version number for {self.model_names}")

    def _mark_ready(self, targets: dict[str, Path], version: int) -> None:
        """The last step: from the last marker written on, every model of the publish is served."""
        for name in self.model_names:
            write_ready(targets[name], version, self.model_names)
            _fsync_dir(targets[name])

    def _copy_model_configs(self, targets: dict[str, Path]) -> None:
        """The newest config.pbtxt also beside the versions, where Triton reads it."""
        for name in self.model_names:
            config = targets[name] / CONFIG_FILE
            if config.is_file():
                write_text_atomic(
                    config.parent.parent / CONFIG_FILE, config.read_text(encoding="utf-8")
                )

    def _release(self) -> None:
        for fd in self._locks:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._locks = []

    def abort(self) -> None:
        """Remove everything staged; nothing is published."""
        for staged in self._staged.values():
            shutil.rmtree(staged, ignore_errors=True)
        self._staged = {}
        self._release()

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
