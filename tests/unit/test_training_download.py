"""MovieLens download: the archive is unpacked only when its SHA-256 matches (file:// URL, no network)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from training.data.download import download_movielens
from training.errors import DataError


def _archive(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-100k/u.data", "1\t1\t5\t881250949\n")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_and_unpacks(tmp_path: Path) -> None:
    archive, digest = _archive(tmp_path)
    out = download_movielens(
        "ml-100k", tmp_path / "data", url=archive.as_uri(), expected_sha256=digest
    )
    assert (out / "u.data").read_text().startswith("1\t1\t5")


def test_checksum_mismatch_unpacks_nothing(tmp_path: Path) -> None:
    archive, _ = _archive(tmp_path)
    with pytest.raises(DataError, match="SHA-256"):
        download_movielens(
            "ml-100k", tmp_path / "data", url=archive.as_uri(), expected_sha256="0" * 64
        )
    assert not (tmp_path / "data" / "ml-100k").exists()
    with pytest.raises(DataError, match="could not download"):
        download_movielens("ml-100k", tmp_path / "data", url=(tmp_path / "none.zip").as_uri())
