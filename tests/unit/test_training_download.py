"""MovieLens download: the archive is unpacked only when its checksums match (file:// URL, no
network)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from training.data.download import download_movielens
from training.errors import DataError


def _archive(tmp_path: Path) -> tuple[Path, str, str]:
    path = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-100k/u.data", "1\t1\t5\t881250949\n")
    data = path.read_bytes()
    return path, hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()


def test_download_verifies_and_unpacks(tmp_path: Path) -> None:
    archive, md5, sha = _archive(tmp_path)
    out = download_movielens(
        "ml-100k", tmp_path / "data", url=archive.as_uri(), expected_md5=md5, expected_sha256=sha
    )
    assert (out / "u.data").read_text().startswith("1\t1\t5")


def test_checksum_mismatch_unpacks_nothing(tmp_path: Path) -> None:
    archive, md5, _ = _archive(tmp_path)
    # GroupLens's published MD5 is for the real archive: this one does not match it.
    with pytest.raises(DataError, match="MD5"):
        download_movielens("ml-100k", tmp_path / "data", url=archive.as_uri())
    with pytest.raises(DataError, match="SHA-256"):
        download_movielens(
            "ml-100k",
            tmp_path / "data",
            url=archive.as_uri(),
            expected_md5=md5,
            expected_sha256="0" * 64,
        )
    assert not (tmp_path / "data" / "ml-100k").exists()
    with pytest.raises(DataError, match="could not download"):
        download_movielens("ml-100k", tmp_path / "data", url=(tmp_path / "none.zip").as_uri())
